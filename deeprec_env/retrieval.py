"""Batched preference-aware retrieval: encode preferences, fuse with histories in the TRM, search faiss.

>>> # retriever = Retriever.for_dataset(load_dataset("ml-100k"))
>>> # ids, scores = retriever.retrieve([history], ["light comedies; 1990s"], k=20)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from deeprec_env.embed import preference_vectors
from deeprec_env.index import IndexConfig, ItemIndex
from deeprec_env.trm import PreferenceTRM, TRMConfig


class Retriever:
    """The TRM, its text encoder and a faiss index over its item vectors, queried in batches.

    Args:
        trm: a trained :class:`~deeprec_env.trm.PreferenceTRM`.
        encoder: the :class:`~deeprec_env.embed.TextEncoder` the TRM was trained with (needed only for
            non-empty preferences; None makes every preference count as empty).
        index_config: faiss index settings.
        index: a prebuilt index to search instead of one over the TRM's item vectors (e.g. a larger
            catalogue for benchmarking); ``index_config`` is then ignored.
    """

    def __init__(
        self,
        trm: PreferenceTRM,
        encoder=None,
        index_config: IndexConfig = IndexConfig(),
        *,
        index: ItemIndex | None = None,
    ) -> None:
        self.trm = trm.eval()
        self.encoder = encoder
        if encoder is not None and encoder.dim != trm.text_dim:
            raise ValueError(f"encoder dim {encoder.dim} != TRM text dim {trm.text_dim}; use the TRM's encoder")
        if index is None:
            with torch.inference_mode():
                index = ItemIndex(trm.item_vectors().float().cpu().numpy(), index_config)
        elif index.dim != trm.config.d_model:
            raise ValueError(f"index dim {index.dim} != TRM d_model {trm.config.d_model}")
        self.index = index
        self.device = next(trm.parameters()).device
        self.max_len = trm.config.max_len
        self._states: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()

    STATE_CACHE = 8192
    """Histories whose TRM state (last hidden state and text summary) is kept: every call of an episode
    reads the same history, so only its first call runs the sequence encoder."""

    def clear_cache(self) -> None:
        """Forget the cached history states (benchmarks measure episodes on unseen histories)."""
        self._states.clear()

    def _history_states(self, seqs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The TRM's last hidden state ``(B, d)`` and text summary ``(B, 2, d)`` of padded ``seqs``, cached."""
        keys = [row.tobytes() for row in seqs]
        missing = list(dict.fromkeys(k for k in keys if k not in self._states))
        if missing:
            rows = np.stack([np.frombuffer(k, dtype=np.int64) for k in missing])
            with torch.inference_mode():
                h, summary = self.trm.encode(torch.as_tensor(rows, device=self.device))
            for r, k in enumerate(missing):
                self._states[k] = (h[r, -1], None if summary is None else summary[r, -1])
        for k in keys:
            self._states.move_to_end(k)
        states = [self._states[k] for k in keys]
        while len(self._states) > self.STATE_CACHE:
            self._states.popitem(last=False)
        h = torch.stack([st[0] for st in states])
        summary = None if states[0][1] is None else torch.stack([st[1] for st in states])
        return h, summary

    @classmethod
    def for_dataset(
        cls,
        dataset,
        trm_config: TRMConfig = TRMConfig(),
        encoder=None,
        index_config: IndexConfig = IndexConfig(),
        *,
        checkpoint: str | None = None,
        progress: bool = True,
    ) -> Retriever:
        """The retriever for ``dataset``: loads ``checkpoint`` or the cached TRM (training it once)."""
        from deeprec_env.embed import TextEncoder
        from deeprec_env.trm import load_or_train_trm, load_trm

        encoder = encoder or TextEncoder(device=trm_config.device)
        if checkpoint is not None:
            trm = load_trm(checkpoint, dataset, device=trm_config.device)
        else:
            trm = load_or_train_trm(dataset, trm_config, encoder, progress=progress)
        return cls(trm, encoder, index_config)

    def _pad(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        out = np.zeros((len(histories), self.max_len), dtype=np.int64)
        for r, h in enumerate(histories):
            h = np.asarray(h, dtype=np.int64)[-self.max_len :]
            if len(h):
                out[r, self.max_len - len(h) :] = h
        n = self.trm.num_embeddings - 1
        if out.max(initial=0) > n or out.min(initial=0) < 0:
            raise ValueError(f"history item ids must be in 1..{n}")
        return out

    def user_vectors(self, histories: Sequence[np.ndarray], preferences: Sequence[str] | None = None) -> np.ndarray:
        """``(B, d)`` float32 query vectors; distinct non-empty preferences are encoded in one batch."""
        if preferences is not None and len(preferences) != len(histories):
            raise ValueError(f"{len(preferences)} preferences for {len(histories)} histories")
        h, summary = self._history_states(self._pad(histories))
        pref = has = None
        if preferences is not None and self.encoder is not None:
            vecs, given = preference_vectors(self.encoder, preferences)
            if given.any():
                pref = torch.as_tensor(vecs, device=self.device)
                has = torch.as_tensor(given, device=self.device)
        with torch.inference_mode():
            return self.trm.fuse(h, pref, has, summary=summary).float().cpu().numpy()

    def rank(self, history: np.ndarray, items: Sequence[int]) -> list[int]:
        """``items`` ordered by the TRM's score for ``history`` without a preference (stable on ties)."""
        items = [int(i) for i in items]
        if not items:
            return []
        q = self.user_vectors([history])[0]
        with torch.inference_mode():
            scores = self.trm.item_vectors()[torch.as_tensor(items)].float().cpu().numpy() @ q
        return [items[j] for j in np.argsort(-scores, kind="stable")]

    def retrieve(
        self,
        histories: Sequence[np.ndarray],
        preferences: Sequence[str] | None = None,
        k: int = 20,
        *,
        exclude: Sequence[Sequence[int]] | None = None,
        exclude_history: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` item ids and scores ``(B, k)`` for each (history, preference) pair.

        Args:
            histories: item-id arrays, oldest first (the TRM reads the last ``max_len``).
            preferences: free-text preferences; "" (or None for all) means no preference.
            k: items per query.
            exclude: per query, items not to return (e.g. already retrieved in the episode).
            exclude_history: also exclude each query's whole history.
        """
        q = self.user_vectors(histories, preferences)
        if exclude_history or exclude is not None:
            rows = []
            for r in range(len(histories)):
                ex = list(exclude[r]) if exclude is not None else []
                if exclude_history:
                    ex.extend(int(i) for i in histories[r])
                rows.append(np.unique(np.asarray(ex, dtype=np.int64)))
            return self.index.search(q, k, rows)
        return self.index.search(q, k)
