"""The preference-aware traditional recommender (TRM), after DeepRec's "AddRet" (``docs/trm.md``).

Architecture: each history item is its learned ID embedding plus its frozen text embedding passed
through a mixture-of-experts adapter; a causal SASRec-style Transformer encodes the sequence. A
preference text, embedded by the same encoder and passed through the same adapter, enters the query in
one of two ways (``TRMConfig.fusion``): ``add``, the reference's, adds it to the last hidden state and
LayerNorms the sum; ``gated`` (default) adds it as a separate unit vector weighted by a learned trust
``a >= 0``, so an item scores ``cos(history, item) + a * cos(preference, item)``: the preference is
evidence next to the history's. The trust comes from a small MLP over the history state, the preference
and how much the preference agrees with the history's texts. Items are scored over the whole catalogue by
their ID embedding plus adapted text (``item_text_out``), one inner product each (a faiss index).

Training objective (ours; the reference never released its training code): next-item cross-entropy
over the full catalogue at every position of each training window (SASRec-style), with a temperature
on the cosine. Each position gets a preference drawn from a mixture of sources
(:class:`~deeprec_env.preferences.PreferenceMix`): none, partial descriptions of the target (a category,
its decade, "like <a neighbour>", a title word), descriptions of the user's history (often wrong for the
target) and noise, in varied phrasings. The model therefore works without a preference and learns how
much each kind of preference is worth. Early stopping on validation NDCG@10 (no preference).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from deeprec_env.config import Device, Dtype, check_fields, torch_device
from deeprec_env.data import RecDataset, cache_dir
from deeprec_env.metrics import full_ranks, ndcg_at_k, ndcg_full
from deeprec_env.preferences import PreferenceBank, PreferenceMix, right_aligned_contexts
from deeprec_env.storage import atomic_write, discard, prepare_folder, sha256_file

TRAINING_VERSION = 2
"""Bumped whenever training changes what a configuration produces, so a cached TRM is never stale."""
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TRMConfig:
    """Architecture and training settings of :class:`PreferenceTRM`.

    The defaults train on ml-100k in under 3 minutes on a 2-core CPU (``docs/trm.md``). The reference's
    window of 20 items, batches of 128 and dropout 0.1 converge within that budget, where windows of 50 and
    batches of 256 (4x fewer optimiser steps per epoch) did not; with the moving average of the weights the
    validation score is flat from about epoch 20, hence 40 epochs and a patience of 12.
    """

    d_model: int = 64
    """Hidden size of the sequence encoder and of item ID embeddings."""
    n_layers: int = 2
    """Transformer layers."""
    n_heads: int = 2
    """Attention heads."""
    ffn_dim: int = 256
    """Feed-forward width."""
    dropout: float = 0.1
    """Dropout on embeddings and inside the Transformer."""
    max_len: int = 20
    """History window the TRM reads (most recent items; the reference reads 20)."""
    n_experts: int = 4
    """Experts in the text adapter (mixture of linear maps, softmax gate)."""
    use_text: bool = True
    """Add adapted item text embeddings to item ID embeddings (False: ID-only, i.e. plain SASRec)."""
    use_preference: bool = True
    """Train with and accept preference texts (False: the preference is ignored)."""
    score: Literal["cosine", "dot"] = "cosine"
    """Item score: cosine of user vector and item ID embedding (reference), or dot product (SASRec)."""
    temperature: float = 0.1
    """Softmax temperature on cosine scores during training (chosen with ``lr`` by validation NDCG:
    ``python -m benchmarks.trm_sweep``, ``docs/trm.md``; the reference's 0.07 scored lower)."""
    preferences: PreferenceMix = field(default_factory=PreferenceMix)
    """Where training preferences come from (shares per source; see :mod:`deeprec_env.preferences`)."""
    fusion: Literal["add", "gated"] = "gated"
    """How a preference enters the query. ``add`` is the reference's AddRet: LayerNorm(h + adapter(p)),
    scored by cosine. ``gated``: unit(LayerNorm(h)) + a * unit(adapter(p)), so an item scores
    cos(history, item) + a * cos(preference, item), with a trust ``a >= 0`` computed from the history state
    and the preference by a small MLP: the preference is evidence added to the history's, not a replacement."""
    item_text_out: bool = False
    """Score items by their ID embedding plus their adapted text (the item representation the sequence
    reads); False (default, the reference's): by the ID embedding only. On ml-100k the ID-only scoring was
    as good without a preference and followed "like <title>" preferences better (``docs/trm.md``)."""
    held_out: int = 2
    """Items at the end of each user's sequence the TRM never trains on: 2 keeps out the valid and test
    targets (the bundled trainers train policies on the test targets of the RL user group, which the TRM
    never saw; ``docs/evaluation.md``); 3 also keeps out the ``train`` split's targets, for a policy trained
    on that split."""
    lr: float = 5e-3
    """Adam learning rate (3e-3 was still climbing at 40 epochs; ``docs/trm.md``)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 128
    """Training windows per step."""
    max_epochs: int = 40
    """Upper bound on epochs (about 4 s each on ml-100k on a 2-core CPU)."""
    patience: int = 12
    """Stop after this many evaluations without a better validation NDCG@10."""
    ema: float = 0.995
    """Decay of an exponential moving average of the weights, updated after every optimiser step; the
    average is what is validated and kept (0: the raw weights). On ml-100k the validation curve is a flat
    plateau whose epoch-to-epoch wiggles are noise; the average sits in the middle of it."""
    max_seconds: float | None = None
    """Optional wall-clock budget (the best checkpoint so far is kept). A time budget makes the result
    depend on machine speed and load, so it is off by default: epochs and patience are deterministic."""
    seed: int = 0
    """Seed of initialisation, window shifts, preference sampling and dropout."""
    device: Device = "cpu"
    """Torch device for training and inference."""
    dtype: Dtype = "float32"
    """Weight dtype for inference after training (training runs in float32)."""

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("d_model", "n_layers", "n_heads", "ffn_dim", "max_len", "n_experts", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; must be >= 1")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout}; must be in [0, 1)")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema={self.ema}; must be in [0, 1) (0 turns the weight average off)")
        if self.held_out < 2:
            raise ValueError(f"held_out={self.held_out}; must be >= 2 (the valid and test targets)")
        if isinstance(self.preferences, dict):  # from a checkpoint's config.json
            object.__setattr__(self, "preferences", PreferenceMix(**self.preferences))
        if not isinstance(self.preferences, PreferenceMix):
            raise TypeError(f"preferences={self.preferences!r}; must be a PreferenceMix (or a dict of its fields)")
        if self.fusion not in ("add", "gated"):
            raise ValueError(f"fusion={self.fusion!r}; must be 'add' or 'gated'")
        if self.score not in ("cosine", "dot"):
            raise ValueError(f"score={self.score!r}; must be 'cosine' or 'dot'")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}; must be > 0")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; must be one of {list(_DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a torch dtype."""
        return _DTYPES[self.dtype]


class MoEAdapter(nn.Module):
    """Mixture of linear experts mapping text embeddings to the model width (softmax gate)."""

    def __init__(self, text_dim: int, d_model: int, n_experts: int) -> None:
        super().__init__()
        self.gate = nn.Linear(text_dim, n_experts)
        self.experts = nn.Parameter(torch.randn(n_experts, text_dim, d_model) / math.sqrt(text_dim))
        self.bias = nn.Parameter(torch.zeros(n_experts, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(..., text_dim)`` to ``(..., d_model)``."""
        g = torch.softmax(self.gate(x), dim=-1)
        y = torch.einsum("...t,etd->...ed", x, self.experts) + self.bias
        return (g.unsqueeze(-1) * y).sum(-2)


class PreferenceTRM(nn.Module):
    """SASRec-style sequence encoder with item text and an additive preference (see module docstring).

    Args:
        config: architecture settings.
        text_emb: ``(num_embeddings, text_dim)`` frozen item text embeddings (row 0 = padding).
    """

    def __init__(self, config: TRMConfig, text_emb: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        n, text_dim = text_emb.shape
        d = config.d_model
        self.register_buffer("text_emb", text_emb.float().clone())
        self.item_emb = nn.Embedding(n, d, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=d**-0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.pos_emb = nn.Embedding(config.max_len, d)
        self.adapter = MoEAdapter(text_dim, d, config.n_experts)
        self.in_norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(
            d, config.n_heads, config.ffn_dim, config.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(d)
        self.pref_norm = nn.LayerNorm(d)
        if config.fusion == "gated":
            self.gate = nn.Sequential(nn.Linear(3 * d + 2, d), nn.GELU(), nn.Linear(d, 1))

    @property
    def num_embeddings(self) -> int:
        """Rows of the item table (``n_items + 1``)."""
        return self.item_emb.num_embeddings

    @property
    def text_dim(self) -> int:
        """Width of the text embeddings the adapter takes."""
        return self.text_emb.shape[1]

    def hidden(self, seqs: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(B, L, d)`` of left-padded item sequences ``(B, L)`` (0 = padding)."""
        return self.encode(seqs)[0]

    def encode(self, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states ``(B, L, d)`` and, with item text, the history's text at each position ``(B, L, 2, d)``.

        The text summary is the running mean of the adapted texts up to each position and the adapted text
        of the item there: what the gated fusion compares a preference with (does it repeat the history,
        or say something new?).
        """
        b, length = seqs.shape
        if length > self.config.max_len:
            seqs, length = seqs[:, -self.config.max_len :], self.config.max_len
        x = self.item_emb(seqs)
        real = (seqs > 0).unsqueeze(-1)
        summary = None
        if self.config.use_text:
            if self.num_embeddings <= seqs.numel():  # adapt the whole (small) table once, then gather
                text = self.adapter(self.text_emb)[seqs]
            else:
                text = self.adapter(self.text_emb[seqs])
            text = text * real
            x = x + text
            mean = text.cumsum(1) / real.cumsum(1).clamp(min=1)
            summary = torch.stack([mean, text], 2)
        pos = torch.arange(self.config.max_len - length, self.config.max_len, device=seqs.device)
        x = self.drop(self.in_norm(x + self.pos_emb(pos)))
        # Each query sees non-padding keys at or before it, and always itself (no empty rows).
        causal = torch.ones(length, length, dtype=torch.bool, device=seqs.device).tril()
        allowed = causal.unsqueeze(0) & (seqs > 0).unsqueeze(1)
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=seqs.device)
        mask = (~allowed).repeat_interleave(self.config.n_heads, dim=0)
        return self.out_norm(self.encoder(x, mask=mask)), summary

    def fuse(
        self,
        h: torch.Tensor,
        pref: torch.Tensor | None,
        has_pref: torch.Tensor | None,
        adapted: torch.Tensor | None = None,
        summary: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The query for hidden states ``h`` ``(N, d)`` and preference text embeddings ``pref`` ``(N, text_dim)``.

        ``add``: LayerNorm(h + adapter(pref)); ``gated``: unit(LayerNorm(h)) + a * unit(adapter(pref)) with the
        trust ``a = softplus(gate(...))``. Rows where ``has_pref`` is False get no preference. ``adapted``
        passes ``adapter(pref)`` already computed (training adapts each distinct text once per step);
        ``summary`` ``(N, 2, d)`` is the history's text at those positions (see :meth:`encode`).
        The result is unit-normalised for cosine scoring except the gated preference term, whose length
        ``a`` is the weight of the preference's evidence.
        """
        use = (pref is not None or adapted is not None) and self.config.use_preference
        p = None
        if use:
            p = self.adapter(pref.to(h.dtype)) if adapted is None else adapted.to(h.dtype)
            if has_pref is not None:
                p = p * has_pref.unsqueeze(-1).to(h.dtype)
        if self.config.fusion == "add" or p is None:
            u = self.pref_norm(h if p is None else h + p)
            return nn.functional.normalize(u, dim=-1) if self.config.score == "cosine" else u
        u, summary_unit = self.history_query(h, summary)
        return self.gated(u, summary_unit, nn.functional.normalize(p, dim=-1), has_pref)

    def history_query(self, h: torch.Tensor, summary: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the gated fusion reads of a history (inference caches it).

        Its query without a preference ``(N, d)`` and its unit-normalised text summary ``(N, 2, d)`` (None
        without item text).
        """
        u = self.pref_norm(h)
        u = nn.functional.normalize(u, dim=-1) if self.config.score == "cosine" else u
        return u, None if summary is None else nn.functional.normalize(summary.to(u.dtype), dim=-1)

    def gated(
        self, u: torch.Tensor, summary_unit: torch.Tensor | None, p_unit: torch.Tensor, has_pref: torch.Tensor | None
    ) -> torch.Tensor:
        """The gated query ``u + a * p_unit``, with the trust ``a = softplus(gate(...))``.

        ``u`` and ``summary_unit`` come from :meth:`history_query`; ``p_unit`` is the unit adapted
        preference (zero rows: no preference).
        """
        if summary_unit is None:
            agree = torch.zeros(*p_unit.shape[:-1], 2, dtype=p_unit.dtype, device=p_unit.device)
        else:
            agree = (summary_unit * p_unit.unsqueeze(-2)).sum(-1)
        trust = nn.functional.softplus(self.gate(torch.cat([u, p_unit, u * p_unit, agree], -1)))
        if has_pref is not None:
            trust = trust * has_pref.unsqueeze(-1).to(u.dtype)
        return u + trust * p_unit

    def item_vectors(self) -> torch.Tensor:
        """Output item vectors ``(num_embeddings, d)``: ID embeddings (plus adapted text with ``item_text_out``).

        Unit-normalised for cosine scoring.
        """
        w = self.item_emb.weight
        if self.config.item_text_out and self.config.use_text:
            w = w + self.adapter(self.text_emb) * (torch.arange(len(w), device=w.device) > 0).unsqueeze(-1)
        return nn.functional.normalize(w, dim=-1) if self.config.score == "cosine" else w

    def user_vectors(
        self, seqs: torch.Tensor, pref: torch.Tensor | None = None, has_pref: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Query vectors ``(B, d)`` for the last position of each sequence (see :meth:`fuse`)."""
        h, summary = self.encode(seqs)
        return self.fuse(h[:, -1], pref, has_pref, summary=None if summary is None else summary[:, -1])

    def scores(self, seqs: torch.Tensor, pref=None, has_pref=None) -> torch.Tensor:
        """Full-catalogue scores ``(B, num_embeddings)`` (column 0, padding, is -inf)."""
        s = self.user_vectors(seqs, pref, has_pref) @ self.item_vectors().T
        s[:, 0] = -torch.inf
        return s


# ----------------------------------------------------------------------------------------------
# Training


def _windows(seqs: list[np.ndarray], max_len: int, rng: np.random.Generator) -> np.ndarray:
    """Cut training sequences into left-padded windows of ``max_len + 1`` items (inputs + next items).

    The first window of a sequence ends at its last item; earlier windows end ``r + k * max_len``
    items before it, with ``r`` random per sequence and epoch, so window borders move between epochs.
    """
    rows = []
    for s in seqs:
        n = len(s)
        ends = [n, *range(n - max_len - int(rng.integers(0, max_len)), 1, -max_len)] if n >= 2 else []
        rows.extend(s[max(0, e - max_len - 1) : e] for e in ends)
    out = np.zeros((len(rows), max_len + 1), dtype=np.int64)
    for r, w in enumerate(rows):
        out[r, max_len + 1 - len(w) :] = w
    return out


@torch.no_grad()
def rank_examples(
    model: PreferenceTRM,
    histories: np.ndarray,
    targets: np.ndarray,
    preferences: list[str] | None = None,
    encoder=None,
    *,
    exclude: list[np.ndarray] | None = None,
    top: int = 0,
    batch_size: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """Full-ranking rank of each target, and the ``top`` best item ids of each query.

    Args:
        model: the TRM.
        histories: ``(n, L)`` left-padded item ids.
        targets: ``(n,)`` item ids.
        preferences: one text per example ("" = none), or None for no preference at all.
        encoder: the text encoder the TRM was trained with (needed with ``preferences``).
        exclude: per example, items removed from the ranking (e.g. the history).
        top: how many best items to return per example (0: none).
        batch_size: examples per forward pass.

    Returns:
        ``(ranks, top_ids)``: ranks ``(n,)`` (0-based, ties by item id, ``-1`` for an excluded target)
        and ``(n, top)`` item ids, best first.
    """
    model.eval()
    device = next(model.parameters()).device
    pref = has = None
    if preferences is not None:
        if encoder is None:
            raise ValueError("preferences need an encoder")
        if len(preferences) != len(targets):
            raise ValueError(f"{len(preferences)} preferences for {len(targets)} examples")
        from deeprec_env.embed import preference_vectors

        pref, has = preference_vectors(encoder, preferences)
    ranks, tops = [], []
    for s in range(0, len(targets), batch_size):
        seqs = torch.as_tensor(histories[s : s + batch_size], device=device)
        p = h = None
        if pref is not None:
            p = torch.as_tensor(pref[s : s + batch_size], device=device)
            h = torch.as_tensor(has[s : s + batch_size], device=device)
        scores = model.scores(seqs, p, h).float().cpu().numpy()
        excl = exclude[s : s + batch_size] if exclude is not None else None
        ranks.append(full_ranks(scores, targets[s : s + batch_size], excl))
        if top:
            if excl is not None:
                for r, ex in enumerate(excl):
                    scores[r, np.asarray(ex, dtype=np.int64)] = -np.inf
            ids = np.arange(scores.shape[1])
            tops.append(np.lexsort((np.broadcast_to(ids, scores.shape), -scores), axis=1)[:, :top])
    top_ids = np.concatenate(tops) if tops else np.zeros((len(targets), 0), dtype=np.int64)
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64), top_ids


def evaluate_ranks(
    model: PreferenceTRM,
    dataset: RecDataset,
    split: str = "valid",
    preferences: list[str] | None = None,
    encoder=None,
    batch_size: int = 512,
    exclude_history: bool = False,
) -> np.ndarray:
    """Full-ranking rank of each example's target (``split`` of ``dataset``), optionally with preferences."""
    sp = dataset.split(split)
    excl = [sp.history(i, 10**9) for i in range(len(sp))] if exclude_history else None
    hist = sp.histories(model.config.max_len)
    return rank_examples(model, hist, sp.targets, preferences, encoder, exclude=excl, batch_size=batch_size)[0]


@dataclass
class _PreferenceSampler:
    """Draws a training preference for every trained position of a window batch (bank row 0 = none)."""

    bank: PreferenceBank
    vectors: torch.Tensor
    """``(len(bank.texts) + 1, text_dim)`` encoded bank texts; row 0 is zero (no preference)."""
    mix: PreferenceMix

    def sample(self, inp: np.ndarray, valid: np.ndarray, targets: np.ndarray, rng: np.random.Generator):
        """Bank rows ``(N,)`` for the ``valid`` positions of input windows ``inp`` ``(B, L)``."""
        contexts = right_aligned_contexts(inp)[valid]
        return self.bank.sample(self.mix, targets, contexts, rng)


def _train_step(model: PreferenceTRM, batch: torch.Tensor, sampler, rng, config: TRMConfig) -> torch.Tensor:
    """Next-item cross-entropy over the catalogue at every non-padding position of a window batch.

    Two terms: every position without a preference (the TRM alone must be a good recommender), plus every
    position that drew a preference, with it (what the preference adds). The first keeps the no-preference
    ranking as good as a model trained without preferences at all.
    """
    inp, tgt = batch[:, :-1], batch[:, 1:]
    valid = (tgt > 0) & (inp > 0)
    h, summary = model.encode(inp)
    h, tgt = h[valid], tgt[valid]
    summary = None if summary is None else summary[valid]
    items = model.item_vectors().T
    scale = 1.0 / config.temperature if config.score == "cosine" else 1.0

    def loss_of(u: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = (u @ items) * scale
        logits[:, 0] = -torch.inf
        return nn.functional.cross_entropy(logits, targets)

    loss = loss_of(model.fuse(h, None, None, summary=summary), tgt)
    if sampler is not None and config.use_preference:
        rows = sampler.sample(inp.cpu().numpy(), valid.cpu().numpy(), tgt.cpu().numpy(), rng)
        given = torch.as_tensor(rows > 0, device=h.device)
        if bool(given.any()):
            distinct, inverse = np.unique(rows[rows > 0], return_inverse=True)
            device = h.device
            adapted = model.adapter(sampler.vectors[torch.as_tensor(distinct, device=device)])  # each text once
            adapted = adapted[torch.as_tensor(inverse, device=device)]
            # the history's state is taken as given here: the preference term trains the gate, the adapter and
            # the item vectors, while the sequence encoder learns from the no-preference term alone
            context = None if summary is None else summary[given].detach()
            q = model.fuse(h[given].detach(), None, None, adapted, context)
            loss = loss + loss_of(q, tgt[given])
    return loss


def trm_sequences(dataset: RecDataset, config: TRMConfig) -> list[np.ndarray]:
    """The sequences the TRM trains on: each user's items without the last ``config.held_out``."""
    extra = config.held_out - 2
    return [s[: len(s) - extra] for s in dataset.train_sequences()]


@torch.no_grad()
def _ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """``average <- decay * average + (1 - decay) * model``, parameter by parameter."""
    for a, p in zip(average.parameters(), model.parameters(), strict=True):
        a.lerp_(p, 1.0 - decay)


def train_trm(
    dataset: RecDataset,
    config: TRMConfig = TRMConfig(),
    encoder=None,
    *,
    text_emb: np.ndarray | None = None,
    progress: bool = True,
) -> tuple[PreferenceTRM, dict]:
    """Train a :class:`PreferenceTRM` on ``dataset.train_sequences()``; early stopping on valid NDCG@10.

    Same seed, same model: initialisation, dropout, window shifts and preference sampling draw from
    generators seeded by ``config.seed`` (the caller's global torch generator is forked, not touched),
    and deterministic kernels are switched on for the duration (multi-threaded embedding backward on
    a CPU is not deterministic otherwise).

    Args:
        dataset: the dataset (its valid split is used for early stopping).
        config: architecture and training settings.
        encoder: a :class:`~deeprec_env.embed.TextEncoder` (default: the embedded MiniLM); used for
            item texts (cached) and the training preference strings.
        text_emb: precomputed item text embeddings (skips the encoder for items).
        progress: show a progress bar.

    Returns:
        The best model (eval mode, on ``config.device`` in ``config.dtype``) and a log dict with the
        per-epoch losses, validation NDCG@10 and wall time.
    """
    import time

    from tqdm.auto import tqdm

    from deeprec_env.embed import TextEncoder, item_text_embeddings

    t0 = time.perf_counter()
    use_pref = config.use_preference and config.preferences.none < sum(config.preferences.weights.values())
    device = torch_device(config.device, "TRMConfig.device")  # before any work: a GPU this machine lacks
    if encoder is None and (text_emb is None or use_pref):
        encoder = TextEncoder(device=device)
    if text_emb is None:
        text_emb = item_text_embeddings(dataset.catalog, encoder)
    seqs = trm_sequences(dataset, config)
    sampler = None
    if use_pref:
        bank = PreferenceBank.build(dataset.catalog, seqs)
        vecs = encoder.encode(bank.texts) if bank.texts else np.zeros((0, text_emb.shape[1]), np.float32)
        vecs = torch.cat([torch.zeros(1, text_emb.shape[1]), torch.as_tensor(vecs).float()]).to(device)  # 0 = none
        sampler = _PreferenceSampler(bank, vecs, config.preferences)

    rng = np.random.default_rng(config.seed)
    log: dict = {"epochs": [], "config": asdict(config)}
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = PreferenceTRM(config, torch.as_tensor(text_emb)).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
            average = copy.deepcopy(model).eval() if config.ema else model  # what is validated and kept
            updates = 0
            best, best_ndcg10, best_state, bad = -1.0, 0.0, None, 0
            bar = tqdm(range(config.max_epochs), desc=f"TRM {dataset.name}", disable=not progress, unit="epoch")
            for epoch in bar:
                model.train()
                win = _windows(seqs, config.max_len, rng)
                win = win[rng.permutation(len(win))]
                total, count = 0.0, 0
                for s in range(0, len(win), config.batch_size):
                    batch = torch.as_tensor(win[s : s + config.batch_size], device=device)
                    loss = _train_step(model, batch, sampler, rng, config)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                    opt.step()
                    updates += 1
                    if config.ema:
                        _ema_update(average, model, min(config.ema, (1 + updates) / (10 + updates)))
                    n = int(((batch[:, 1:] > 0) & (batch[:, :-1] > 0)).sum())
                    total, count = total + float(loss.detach()) * n, count + n
                ranks = evaluate_ranks(average, dataset, "valid")
                ndcg, score = ndcg_at_k(ranks, 10), ndcg_full(ranks)
                log["epochs"].append({"epoch": epoch, "loss": total / max(count, 1), "valid_ndcg@10": ndcg,
                                      "valid_ndcg": score})  # fmt: skip
                bar.set_postfix(loss=f"{total / max(count, 1):.3f}", ndcg10=f"{ndcg:.4f}", ndcg=f"{score:.4f}")
                if score > best:
                    best, best_ndcg10, bad = score, ndcg, 0
                    best_state = {k: v.detach().clone() for k, v in average.state_dict().items()}
                else:
                    bad += 1
                out_of_time = config.max_seconds is not None and time.perf_counter() - t0 > config.max_seconds
                if bad >= config.patience or out_of_time:
                    break
            model.load_state_dict(best_state)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    model = model.to(dtype=config.torch_dtype).eval()
    log.update(best_valid_ndcg=best, best_valid_ndcg10=best_ndcg10, seconds=time.perf_counter() - t0,
               epochs_run=len(log["epochs"]))  # fmt: skip
    return model, log


# ----------------------------------------------------------------------------------------------
# Checkpoints: a folder with model.safetensors + config.json, replaced atomically


TRM_FILES = ("model.safetensors", "config.json")
"""What a TRM checkpoint folder holds; ``config.json`` is written last and names the weights' SHA-256."""


def weights_digest(model: nn.Module) -> str:
    """A short SHA-256 of ``model``'s weights (as float32, in name order): which TRM a figure came from.

    The same settings and seed train the same weights on one machine; another CPU type or torch thread count
    sums floats in another order and trains slightly different ones (``docs/trm.md``), so benchmark protocols
    print this digest next to their figures.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def weights_line(digest: str) -> str:
    """The protocol line that names a TRM by its :func:`weights_digest` (and where reproducing one is explained)."""
    return f"weights {digest} (docs/trm.md: which machines train the same TRM)"


def save_trm(model: PreferenceTRM, path: str | os.PathLike, dataset: RecDataset, extra: dict | None = None) -> Path:
    """Write ``path/model.safetensors``, then ``path/config.json`` (dataset fingerprint, weights' SHA-256).

    Each file is replaced atomically, so a reader never sees half a file and concurrent savers end with one
    whole checkpoint; a kill between the two leaves a pair whose checksum does not match, which
    :func:`load_trm` refuses (and the cache rebuilds). ``path`` is created, or must hold only a TRM
    checkpoint (it is overwritten); a folder with other files is refused before anything is written.
    """
    from safetensors.torch import save_file

    path = prepare_folder(path, TRM_FILES, "a TRM checkpoint")
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    digest = {}

    def write_weights(tmp: Path) -> None:
        save_file(state, str(tmp))
        digest["sha256"] = sha256_file(tmp)

    atomic_write(path / "model.safetensors", write_weights)
    meta = {
        "format": "deeprec-trm/1",
        "config": asdict(model.config),
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint, "n_items": dataset.n_items},
        "text_dim": model.text_dim,
        "weights_sha256": digest["sha256"],
        **(extra or {}),
    }
    atomic_write(path / "config.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return path


def load_trm(
    path: str | os.PathLike, dataset: RecDataset | None = None, *, device: str | None = None, dtype: str | None = None
) -> PreferenceTRM:
    """Load a checkpoint written by :func:`save_trm`; refuses one trained on another dataset or a corrupt one."""
    from safetensors.torch import load_file

    if device is not None:
        torch_device(device)  # a GPU this machine lacks: before anything is read
    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{path}: not a TRM checkpoint (expected config.json and model.safetensors)")
    try:
        meta = json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e}); the checkpoint is corrupt") from e
    expected = meta.get("weights_sha256")
    if expected is not None and sha256_file(weights) != expected:
        raise ValueError(f"{weights} does not match the checksum in config.json: corrupt or partly written")
    if dataset is not None and meta["dataset"]["fingerprint"] != dataset.fingerprint:
        d = meta["dataset"]
        raise ValueError(
            f"{path} was trained on dataset {d['name']!r} ({d['n_items']} items, fingerprint {d['fingerprint']}); "
            f"this dataset is {dataset.name!r} ({dataset.n_items} items, fingerprint {dataset.fingerprint}). "
            "Train a TRM for this dataset (deeprec trm-train) or load the matching one."
        )
    overrides = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    config = replace(TRMConfig(**meta["config"]), **overrides)
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors' own error type for a truncated file
        raise ValueError(f"{weights}: unreadable ({type(e).__name__}: {e})") from e
    model = PreferenceTRM(config, state["text_emb"])
    model.load_state_dict(state)
    return model.to(device=torch_device(config.device, "TRMConfig.device"), dtype=config.torch_dtype).eval()


def trm_cache_path(dataset: RecDataset, config: TRMConfig, encoder) -> Path:
    """Where :func:`load_or_train_trm` keeps the TRM of (dataset, config, text encoder)."""
    enc_id = encoder.id
    key_cfg = {k: v for k, v in asdict(config).items() if k not in ("device", "dtype")}
    key = [TRAINING_VERSION, dataset.fingerprint, key_cfg, enc_id]
    key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir() / "trm" / f"{dataset.name.replace(':', '_')}-{key[:16]}"


def load_or_train_trm(
    dataset: RecDataset, config: TRMConfig = TRMConfig(), encoder=None, *, progress: bool = True
) -> PreferenceTRM:
    """The TRM for ``dataset`` and ``config`` from the cache, training and caching it on first use."""
    if encoder is None:
        from deeprec_env.embed import TextEncoder

        encoder = TextEncoder(device=config.device)
    path = trm_cache_path(dataset, config, encoder)
    if (path / "config.json").is_file():
        try:
            return load_trm(path, dataset, device=config.device, dtype=config.dtype)
        except Exception as e:  # corrupt or partly written: train again
            for name in TRM_FILES:
                if (path / name).exists():
                    discard(path / name, e, "TRM cache file")
    model, log = train_trm(dataset, config, encoder, progress=progress)
    save_trm(model, path, dataset, {"train_log": log})
    return model
