"""Ranking metrics on item ids (single held-out target, ``docs/evaluation.md``).

A rank is the 0-based position of the target in a ranked list; a miss (target absent, failed or
malformed episode) is ``-1``. Recall@k equals HitRate@k with one target.

>>> ranks = np.array([0, 3, -1, 12])
>>> float(recall_at_k(ranks, 5))
0.5
>>> round(float(ndcg_at_k(ranks, 5)), 4)
0.3577
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

MISS = -1


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Share of targets ranked in the top ``k`` (misses count as 0)."""
    r = np.asarray(ranks)
    return float(np.mean((r >= 0) & (r < k))) if len(r) else 0.0


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    """Mean of ``1 / log2(rank + 2)`` for targets in the top ``k`` (single target: IDCG = 1)."""
    r = np.asarray(ranks)
    if not len(r):
        return 0.0
    hit = (r >= 0) & (r < k)
    gains = np.zeros(len(r))
    gains[hit] = 1.0 / np.log2(r[hit] + 2.0)
    return float(gains.mean())


def ndcg_full(ranks: np.ndarray) -> float:
    """Mean of ``1 / log2(rank + 2)`` over every target, without a cut-off (misses count 0).

    Every example contributes, so it varies far less between two checkpoints than NDCG@10, which
    moves only when a target crosses rank 10: the TRM's early stopping uses it.

    >>> round(ndcg_full(np.array([0, 2, -1])), 4)
    0.5
    """
    r = np.asarray(ranks)
    if not len(r):
        return 0.0
    return float(np.where(r >= 0, 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0).mean())


def rank_metrics(ranks: np.ndarray, recall_ks: Iterable[int] = (1, 5, 10), ndcg_ks: Iterable[int] = (5, 10)) -> dict:
    """``{"recall@k": ..., "ndcg@k": ...}`` for the given cut-offs."""
    out = {f"recall@{k}": recall_at_k(ranks, k) for k in recall_ks}
    out.update({f"ndcg@{k}": ndcg_at_k(ranks, k) for k in ndcg_ks})
    return out


def full_ranks(scores: np.ndarray, targets: np.ndarray, exclude: list[np.ndarray] | None = None) -> np.ndarray:
    """Rank of each target under full ranking of ``scores`` (``(n, num_embeddings)``, column 0 = padding).

    Ties are broken by item id (a lower id ranks first), the same rule :class:`~deeprec_env.index.ItemIndex`
    uses. Columns listed in ``exclude[i]`` (e.g. history items) are removed from row ``i`` first;
    a target that is itself excluded counts as a miss.
    """
    s = np.array(scores, dtype=np.float64, copy=True)
    s[:, 0] = -np.inf
    rows = np.arange(len(s))
    if exclude is not None:
        for i, ex in enumerate(exclude):
            s[i, np.asarray(ex, dtype=np.int64)] = -np.inf
    t = s[rows, targets][:, None]
    ids = np.arange(s.shape[1])[None, :]
    ranks = ((s > t) | ((s == t) & (ids < targets[:, None]))).sum(1)
    ranks[np.isneginf(t[:, 0])] = MISS
    return ranks.astype(np.int64)
