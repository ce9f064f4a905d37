"""Top-k inner-product search over item vectors with faiss; ties are broken by item id.

``kind="exact"`` (default) is ``IndexFlatIP``. For large catalogues ``"hnsw"`` (``IndexHNSWFlat``)
or ``"ivf"`` (``IndexIVFFlat``) trade a little recall for speed; the retrieval benchmark reports
their recall@20 against exact search.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from deeprec_env.config import check_fields

_LAST = np.iinfo(np.int64).max  # sorts a missing entry (id 0) after every real item


@dataclass(frozen=True)
class IndexConfig:
    """Which faiss index to build and how to search it."""

    kind: Literal["exact", "hnsw", "ivf"] = "exact"
    """Exact inner product, or an approximate HNSW / IVF index."""
    hnsw_m: int = 32
    """HNSW graph degree."""
    hnsw_ef_construction: int = 64
    """HNSW build-time beam width."""
    hnsw_ef_search: int = 64
    """HNSW search beam width (raised to the number of candidates fetched when that is larger)."""
    ivf_nlist: int | None = None
    """IVF cells (None: about 4 * sqrt(n_items))."""
    ivf_nprobe: int = 16
    """IVF cells visited per query."""
    threads: int | None = 1
    """OpenMP threads for a search (1 is fastest for small batches on a small CPU; None: the process
    setting). faiss and torch share the OpenMP runtime, so the setting is restored after each search."""
    seed: int = 0
    """Seed of IVF k-means training."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.kind not in ("exact", "hnsw", "ivf"):
            raise ValueError(f"kind={self.kind!r}; must be 'exact', 'hnsw' or 'ivf'")
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; must be >= 1")


class ItemIndex:
    """faiss index over item vectors ``(num_embeddings, d)``; row 0 (padding) is never returned.

    Args:
        vectors: item vectors, row ``i`` = item number ``i``.
        config: index kind and parameters.
    """

    TIE_MARGIN = 8
    """Extra candidates fetched so that equal scores at the cut-off can be ordered by item id."""

    def __init__(self, vectors: np.ndarray, config: IndexConfig = IndexConfig()) -> None:
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) < 2:
            raise ValueError(f"vectors must be (num_embeddings >= 2, d), got shape {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise ValueError("item vectors contain NaN or inf")
        self.config = config
        self.n_items = len(vectors) - 1
        self.dim = vectors.shape[1]
        items = vectors[1:]
        if config.kind == "exact":
            index = faiss.IndexFlatIP(self.dim)
        elif config.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = config.hnsw_ef_construction
        else:
            nlist = config.ivf_nlist or max(1, int(4 * np.sqrt(self.n_items)))
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(config.seed)
            sample = items[rng.choice(len(items), size=min(len(items), 64 * nlist), replace=False)]
            index.cp.seed = config.seed
            index.train(sample)
            index.nprobe = config.ivf_nprobe
        index.add(items)
        self._index = index
        self._faiss = faiss

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[Sequence[int] | np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items of each query, best first; equal scores are ordered by item id.

        Args:
            queries: ``(B, d)`` query vectors.
            k: items per query (capped at the number of items not excluded).
            exclude: per query, item numbers that must not be returned (history, already retrieved).

        Returns:
            ``(ids, scores)``, both ``(B, k)``; rows with fewer than ``k`` candidates (a small
            catalogue minus exclusions, or an approximate index that found fewer) are padded with
            id 0 and score ``-inf``.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got shape {q.shape}")
        if k < 1:
            raise ValueError(f"k={k}; must be >= 1")
        if exclude is not None and len(exclude) != len(q):
            raise ValueError(f"exclude has {len(exclude)} rows for {len(q)} queries")
        n_ex = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        fetch = min(self.n_items, k + n_ex + self.TIE_MARGIN)
        if self.config.kind == "hnsw":
            self._index.hnsw.efSearch = max(self.config.hnsw_ef_search, fetch)
        if self.config.threads is None:
            scores, ids = self._index.search(q, fetch)
        else:
            before = self._faiss.omp_get_max_threads()
            self._faiss.omp_set_num_threads(self.config.threads)
            try:
                scores, ids = self._index.search(q, fetch)
            finally:
                self._faiss.omp_set_num_threads(before)
        ids = ids.astype(np.int64) + 1  # faiss rows are item numbers - 1; -1 (not found) becomes 0
        scores = np.where(ids > 0, scores, -np.inf).astype(np.float32)
        if exclude is not None:
            for r, ex in enumerate(exclude):
                if len(ex):
                    drop = np.isin(ids[r], np.asarray(ex, dtype=np.int64))
                    scores[r, drop] = -np.inf
                    ids[r, drop] = 0
        # best score first, then lower item id; missing entries (id 0, -inf) last
        order = np.lexsort((np.where(ids > 0, ids, _LAST), -scores.astype(np.float64)), axis=1)[:, :k]
        rows = np.arange(len(ids))[:, None]
        ids, scores = ids[rows, order], scores[rows, order]
        if ids.shape[1] < k:
            pad = k - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)))
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return ids, scores
