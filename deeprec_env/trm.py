"""The preference-aware traditional recommender (TRM), after DeepRec's "AddRet" (DESIGN.md section 3).

Architecture: each history item is its learned ID embedding plus its frozen text embedding passed
through a mixture-of-experts adapter; a causal SASRec-style Transformer encodes the sequence; the
preference text, embedded by the same encoder and passed through the same adapter, is added to the
last hidden state and LayerNorm'd; the score of an item is the cosine between that user vector and the
item's ID embedding, over the whole catalogue.

Training objective (ours; the reference never released its training code): next-item cross-entropy
over the full catalogue at every position of each training window (SASRec-style), with a temperature
on the cosine. On a share ``preference_prob`` of positions a preference is given, built from the
*target* item's metadata: a random non-empty subset (size <= 2, or all) of its categories, joined by
"; ". On the rest the preference is empty (no vector is added). The model therefore both works
without a preference and learns to follow one. Early stopping on validation NDCG@10 (no preference).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from deeprec_env.data import RecDataset, cache_dir
from deeprec_env.metrics import full_ranks, ndcg_at_k

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TRMConfig:
    """Architecture and training settings of :class:`PreferenceTRM`.

    The defaults train on ml-100k in just under 3 minutes on a 2-core CPU. They were chosen on the
    validation split (benchmarks/results/trm_quality.md lists the test figures): the reference's
    window of 20 items, batches of 128 and dropout 0.1 converge within the budget, where windows of
    50 and batches of 256 (4x fewer optimiser steps per epoch) did not; the validation score still
    improves past epoch 40, hence 55 epochs and a patience of 20.
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
    temperature: float = 0.07
    """Softmax temperature on cosine scores during training."""
    preference_prob: float = 0.5
    """Share of training positions that get a preference built from the target's categories."""
    lr: float = 3e-3
    """Adam learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 128
    """Training windows per step."""
    max_epochs: int = 55
    """Upper bound on epochs (about 3 s each on ml-100k on a 2-core CPU)."""
    patience: int = 20
    """Stop after this many evaluations without a better validation NDCG@10."""
    max_seconds: float | None = None
    """Optional wall-clock budget (the best checkpoint so far is kept). A time budget makes the result
    depend on machine speed and load, so it is off by default: epochs and patience are deterministic."""
    seed: int = 0
    """Seed of initialisation, window shifts, preference sampling and dropout."""
    device: str = "cpu"
    """Torch device for training and inference."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype for inference after training (training runs in float32)."""

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "ffn_dim", "max_len", "n_experts", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; must be >= 1")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout}; must be in [0, 1)")
        if not 0 <= self.preference_prob <= 1:
            raise ValueError(f"preference_prob={self.preference_prob}; must be in [0, 1]")
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
        b, length = seqs.shape
        if length > self.config.max_len:
            seqs, length = seqs[:, -self.config.max_len :], self.config.max_len
        x = self.item_emb(seqs)
        if self.config.use_text:
            if self.num_embeddings <= seqs.numel():  # adapt the whole (small) table once, then gather
                text = self.adapter(self.text_emb)[seqs]
            else:
                text = self.adapter(self.text_emb[seqs])
            x = x + text * (seqs > 0).unsqueeze(-1)
        pos = torch.arange(self.config.max_len - length, self.config.max_len, device=seqs.device)
        x = self.drop(self.in_norm(x + self.pos_emb(pos)))
        # Each query sees non-padding keys at or before it, and always itself (no empty rows).
        causal = torch.ones(length, length, dtype=torch.bool, device=seqs.device).tril()
        allowed = causal.unsqueeze(0) & (seqs > 0).unsqueeze(1)
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=seqs.device)
        mask = (~allowed).repeat_interleave(self.config.n_heads, dim=0)
        return self.out_norm(self.encoder(x, mask=mask))

    def fuse(
        self,
        h: torch.Tensor,
        pref: torch.Tensor | None,
        has_pref: torch.Tensor | None,
        adapted: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """User vector: LayerNorm(h + adapter(pref)) where ``has_pref``, LayerNorm(h) elsewhere.

        ``adapted`` passes ``adapter(pref)`` already computed (training adapts each distinct preference
        of its bank once per step instead of once per position).
        """
        if (pref is not None or adapted is not None) and self.config.use_preference:
            p = self.adapter(pref.to(h.dtype)) if adapted is None else adapted.to(h.dtype)
            if has_pref is not None:
                p = p * has_pref.unsqueeze(-1).to(h.dtype)
            h = h + p
        return self.pref_norm(h)

    def item_vectors(self) -> torch.Tensor:
        """Output item vectors ``(num_embeddings, d)``: ID embeddings, unit-normalised for cosine scoring."""
        w = self.item_emb.weight
        return nn.functional.normalize(w, dim=-1) if self.config.score == "cosine" else w

    def user_vectors(
        self, seqs: torch.Tensor, pref: torch.Tensor | None = None, has_pref: torch.Tensor | None = None
    ) -> torch.Tensor:
        """User vectors ``(B, d)`` for the last position of each sequence; unit norm with cosine scoring."""
        u = self.fuse(self.hidden(seqs)[:, -1], pref, has_pref)
        return nn.functional.normalize(u, dim=-1) if self.config.score == "cosine" else u

    def scores(self, seqs: torch.Tensor, pref=None, has_pref=None) -> torch.Tensor:
        """Full-catalogue scores ``(B, num_embeddings)`` (column 0, padding, is -inf)."""
        s = self.user_vectors(seqs, pref, has_pref) @ self.item_vectors().T
        s[:, 0] = -torch.inf
        return s


# ----------------------------------------------------------------------------------------------
# Preference texts for training and evaluation


def preference_bank(dataset: RecDataset, max_subset: int = 2, max_categories: int = 6):
    """Training preference strings built from each item's categories.

    Returns ``(texts, offsets, index)``: item ``i``'s candidate strings are
    ``texts[index[offsets[i]:offsets[i+1]]]`` (non-empty subsets of its first ``max_categories``
    categories of size <= ``max_subset``, plus all of them), joined by "; ".
    """
    texts: dict[str, int] = {}
    offsets = [0]
    index: list[int] = []
    for cats in dataset.catalog.categories:
        cats = cats[:max_categories]
        subsets = {c for r in range(1, min(max_subset, len(cats)) + 1) for c in itertools.combinations(cats, r)}
        if cats:
            subsets.add(tuple(cats))
        for s in sorted(subsets):
            index.append(texts.setdefault("; ".join(s), len(texts)))
        offsets.append(len(index))
    return list(texts), np.asarray(offsets), np.asarray(index, dtype=np.int64)


def oracle_preference(dataset: RecDataset, item: int) -> str:
    """The target's own categories (privileged information: an upper bound)."""
    return "; ".join(dataset.catalog.categories[item])


def misleading_preference(dataset: RecDataset, item: int, n: int = 2) -> str:
    """The ``n`` most frequent categories that ``item`` does not have."""
    own = set(dataset.catalog.categories[item])
    return "; ".join([c for c in dataset.catalog.all_categories if c not in own][:n])


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
    model.eval()
    sp = dataset.split(split)
    hist = sp.histories(model.config.max_len)
    device = next(model.parameters()).device
    pref = None
    if preferences is not None:
        if encoder is None:
            raise ValueError("preferences need an encoder")
        pref = encoder.encode(preferences)
        has = np.array([bool(p.strip()) for p in preferences])
    ranks = []
    for s in range(0, len(sp), batch_size):
        seqs = torch.as_tensor(hist[s : s + batch_size], device=device)
        p = h = None
        if pref is not None:
            p = torch.as_tensor(pref[s : s + batch_size], device=device)
            h = torch.as_tensor(has[s : s + batch_size], device=device)
        scores = model.scores(seqs, p, h).float().cpu().numpy()
        excl = [sp.history(i, 10**9) for i in range(s, min(s + batch_size, len(sp)))] if exclude_history else None
        ranks.append(full_ranks(scores, sp.targets[s : s + batch_size], excl))
    return np.concatenate(ranks)


@dataclass
class _PreferenceSampler:
    """Draws a training preference for each target: a bank row (0 = none) per position."""

    bank: torch.Tensor
    offsets: np.ndarray
    index: np.ndarray
    prob: float

    def sample(self, targets: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Bank rows ``(N,)`` (0 = no preference) and the mask of positions that got one."""
        n_cand = np.diff(self.offsets)[targets]
        give = (rng.random(len(targets)) < self.prob) & (n_cand > 0)
        pick = self.offsets[targets] + (rng.random(len(targets)) * np.maximum(n_cand, 1)).astype(np.int64)
        rows = np.where(give, self.index[np.minimum(pick, len(self.index) - 1)] + 1, 0)
        device = self.bank.device
        return torch.as_tensor(rows, device=device), torch.as_tensor(give, device=device)


def _train_step(model: PreferenceTRM, batch: torch.Tensor, sampler, rng, config: TRMConfig) -> torch.Tensor:
    """Next-item cross-entropy over the catalogue at every non-padding position of a window batch."""
    inp, tgt = batch[:, :-1], batch[:, 1:]
    valid = (tgt > 0) & (inp > 0)
    h, tgt = model.hidden(inp)[valid], tgt[valid]
    adapted = has = None
    if sampler is not None and config.use_preference:
        rows, has = sampler.sample(tgt.cpu().numpy(), rng)
        adapted = model.adapter(sampler.bank)[rows]  # each distinct preference adapted once per step
    u = model.fuse(h, None, has, adapted)
    if config.score == "cosine":
        logits = nn.functional.normalize(u, dim=-1) @ model.item_vectors().T / config.temperature
    else:
        logits = u @ model.item_vectors().T
    logits[:, 0] = -torch.inf
    return nn.functional.cross_entropy(logits, tgt)


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
    use_pref = config.use_preference and config.preference_prob > 0
    if encoder is None and (text_emb is None or use_pref):
        encoder = TextEncoder(device=config.device)
    if text_emb is None:
        text_emb = item_text_embeddings(dataset.catalog, encoder)
    device = torch.device(config.device)
    sampler = None
    if use_pref:
        texts, offsets, index = preference_bank(dataset)
        bank = torch.as_tensor(encoder.encode(texts) if texts else np.zeros((0, text_emb.shape[1]), np.float32))
        bank = torch.cat([torch.zeros(1, text_emb.shape[1]), bank.float()]).to(device)  # row 0 = none
        sampler = _PreferenceSampler(bank, offsets, index, config.preference_prob)

    rng = np.random.default_rng(config.seed)
    seqs = dataset.train_sequences()
    log: dict = {"epochs": [], "config": asdict(config)}
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = PreferenceTRM(config, torch.as_tensor(text_emb)).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
            best, best_state, bad = -1.0, None, 0
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
                    n = int(((batch[:, 1:] > 0) & (batch[:, :-1] > 0)).sum())
                    total, count = total + float(loss.detach()) * n, count + n
                ndcg = ndcg_at_k(evaluate_ranks(model, dataset, "valid"), 10)
                log["epochs"].append({"epoch": epoch, "loss": total / max(count, 1), "valid_ndcg@10": ndcg})
                bar.set_postfix(
                    loss=f"{total / max(count, 1):.3f}", ndcg10=f"{ndcg:.4f}", best=f"{max(best, ndcg):.4f}"
                )
                if ndcg > best:
                    best, bad = ndcg, 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    bad += 1
                out_of_time = config.max_seconds is not None and time.perf_counter() - t0 > config.max_seconds
                if bad >= config.patience or out_of_time:
                    break
            model.load_state_dict(best_state)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    model = model.to(dtype=config.torch_dtype).eval()
    log.update(best_valid_ndcg10=best, seconds=time.perf_counter() - t0, epochs_run=len(log["epochs"]))
    return model, log


# ----------------------------------------------------------------------------------------------
# Checkpoints: a folder with model.safetensors + config.json, replaced atomically


def save_trm(model: PreferenceTRM, path: str | os.PathLike, dataset: RecDataset, extra: dict | None = None) -> Path:
    """Write ``path/model.safetensors`` and ``path/config.json`` (dataset fingerprint included), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        meta = {
            "format": "deeprec-trm/1",
            "config": asdict(model.config),
            "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint, "n_items": dataset.n_items},
            "text_dim": model.text_dim,
            **(extra or {}),
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_trm(
    path: str | os.PathLike, dataset: RecDataset | None = None, *, device: str | None = None, dtype: str | None = None
) -> PreferenceTRM:
    """Load a checkpoint written by :func:`save_trm`; refuses one trained on another dataset."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{path}: not a TRM checkpoint (expected config.json and model.safetensors)")
    meta = json.loads(cfg_file.read_text())
    if dataset is not None and meta["dataset"]["fingerprint"] != dataset.fingerprint:
        d = meta["dataset"]
        raise ValueError(
            f"{path} was trained on dataset {d['name']!r} ({d['n_items']} items, fingerprint {d['fingerprint']}); "
            f"this dataset is {dataset.name!r} ({dataset.n_items} items, fingerprint {dataset.fingerprint}). "
            "Train a TRM for this dataset (deeprec trm-train) or load the matching one."
        )
    overrides = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    config = replace(TRMConfig(**meta["config"]), **overrides)
    state = load_file(str(weights))
    model = PreferenceTRM(config, state["text_emb"])
    model.load_state_dict(state)
    return model.to(device=config.device, dtype=config.torch_dtype).eval()


def trm_cache_path(dataset: RecDataset, config: TRMConfig, encoder) -> Path:
    """Where :func:`load_or_train_trm` keeps the TRM of (dataset, config, text encoder)."""
    enc_id = encoder.id
    key_cfg = {k: v for k, v in asdict(config).items() if k not in ("device", "dtype")}
    key = hashlib.sha256(json.dumps([dataset.fingerprint, key_cfg, enc_id], sort_keys=True).encode()).hexdigest()
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
        except (OSError, ValueError, KeyError, RuntimeError):
            shutil.rmtree(path, ignore_errors=True)
    model, log = train_trm(dataset, config, encoder, progress=progress)
    save_trm(model, path, dataset, {"train_log": log})
    return model
