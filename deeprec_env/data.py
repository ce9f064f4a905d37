"""Datasets: loading, preprocessing (``docs/evaluation.md``), leave-one-out splits and an on-disk cache.

>>> ds = synthetic(n_users=30, n_items=40, seed=0)
>>> test = ds.split("test")
>>> int(test.targets[0]) == int(ds.sequence(int(test.users[0]))[-1])
True
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np

from deeprec_env import sources
from deeprec_env.catalog import Catalog
from deeprec_env.config import check_fields
from deeprec_env.sources import DataFormatError, RawData
from deeprec_env.storage import atomic_write, discard

__all__ = [
    "DataFormatError",
    "PreprocessConfig",
    "RecDataset",
    "Split",
    "load_dataset",
    "preprocess",
    "synthetic",
]

SplitName = Literal["train", "valid", "test"]
SPLITS: tuple[str, ...] = ("train", "valid", "test")
UserGroup = Literal["all", "rl", "eval"]
USER_GROUPS: tuple[str, ...] = ("all", "rl", "eval")
CACHE_VERSION = 1
"""Bumped whenever preprocessing changes meaning, so stale cache entries are never read."""


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw interactions become sequences. Defaults are the evaluation protocol of ``docs/evaluation.md``."""

    min_user_count: int = 5
    """Iterated k-core: users with fewer interactions are dropped (repeat until stable)."""
    min_item_count: int = 5
    """Iterated k-core: items with fewer interactions are dropped (repeat until stable)."""
    min_rating: float | None = None
    """Keep only interactions rated at least this (None: every interaction is positive feedback)."""
    drop_duplicates: bool = False
    """Keep only the first (earliest) interaction of each (user, item) pair. RecBole keeps them all."""
    max_history: int = 50
    """History window: at most this many most recent items precede a target in a split example."""

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("min_user_count", "min_item_count"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}; must be >= 0")
        if self.max_history < 1:
            raise ValueError(f"max_history={self.max_history}; must be >= 1")


def _stable_order(users: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """Row order sorted by (user, time); ties keep file row order (stable sort, as RecBole does)."""
    by_time = np.argsort(timestamps, kind="stable")
    return by_time[np.argsort(users[by_time], kind="stable")]


def _k_core(u: np.ndarray, i: np.ndarray, min_u: int, min_i: int) -> np.ndarray:
    """Boolean mask of interactions that survive the iterated (min_u, min_i)-core filter."""
    keep = np.ones(len(u), dtype=bool)
    while True:
        uc = np.bincount(u[keep], minlength=u.max() + 1 if len(u) else 0)
        ic = np.bincount(i[keep], minlength=i.max() + 1 if len(i) else 0)
        bad = keep & ((uc[u] < min_u) | (ic[i] < min_i))
        if not bad.any():
            return keep
        keep &= ~bad


def preprocess(raw: RawData, config: PreprocessConfig, *, name: str, source: str) -> RecDataset:
    """Turn raw interactions into a :class:`RecDataset` (implicit feedback, k-core, time order).

    Steps: drop interactions whose item has no title; keep ``rating >= min_rating`` if set;
    optionally drop repeated (user, item) pairs; iterated k-core; order each user's items by time
    with a stable sort (ties keep file row order); number items by first appearance in that order.
    """
    n_raw = len(raw.users)
    keep = np.fromiter((it in raw.meta for it in raw.items), dtype=bool, count=n_raw)
    if config.min_rating is not None:
        keep &= raw.ratings >= config.min_rating
    users, items, ts = raw.users[keep], raw.items[keep], raw.timestamps[keep]
    order = _stable_order(users, ts)
    users, items, ts = users[order], items[order], ts[order]
    if config.drop_duplicates and len(users):
        _, first = np.unique(np.char.add(np.char.add(users, "\x1f"), items), return_index=True)
        mask = np.zeros(len(users), dtype=bool)
        mask[first] = True
        users, items, ts = users[mask], items[mask], ts[mask]
    if len(users):
        u_keys, u_codes = np.unique(users, return_inverse=True)
        i_keys, i_codes = np.unique(items, return_inverse=True)
        core = _k_core(u_codes, i_codes, config.min_user_count, config.min_item_count)
        users, items, ts, u_codes, i_codes = users[core], items[core], ts[core], u_codes[core], i_codes[core]
    if len(users) == 0:
        raise DataFormatError(
            f"dataset {name!r} ({source}) is empty after filtering: {n_raw} raw interactions, "
            f"{int(keep.sum())} with item text and rating >= {config.min_rating}, 0 after the "
            f"({config.min_user_count}, {config.min_item_count})-core filter; lower min_user_count/min_item_count"
        )
    # Item numbers 1..n in order of first appearance (deterministic, independent of hash seeds).
    _, first_pos = np.unique(i_codes, return_index=True)
    item_order = np.unique(i_codes)[np.argsort(first_pos, kind="stable")]
    number = np.zeros(i_keys.shape[0], dtype=np.int64)
    number[item_order] = np.arange(1, len(item_order) + 1)
    raw_item_ids = [str(i_keys[c]) for c in item_order]
    catalog = Catalog.from_items(
        raw_item_ids, [raw.meta[r][0] for r in raw_item_ids], [raw.meta[r][1] for r in raw_item_ids]
    )
    user_bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])
    return RecDataset(
        name=name,
        source=source,
        config=config,
        catalog=catalog,
        user_ids=np.asarray([str(u) for u in users[user_bounds[:-1]]]),
        offsets=user_bounds.astype(np.int64),
        items=number[i_codes].astype(np.int64),
        timestamps=ts.astype(np.float64),
        n_raw_interactions=n_raw,
    )


@dataclass(frozen=True, eq=False)
class RecDataset:
    """A preprocessed dataset: a catalogue and each user's items in time order (CSR layout).

    Users are numbered ``0..n_users-1`` in the order of their raw ids; ``sequence(u)`` holds item
    numbers (1-based, see :class:`~deeprec_env.catalog.Catalog`). Immutable; :meth:`split` returns
    new :class:`Split` objects.
    """

    name: str
    """Short dataset name ("ml-100k", "ml-1m", "amazon", "atomic:<path>", "synthetic")."""
    source: str
    """Where the data came from (package or file paths)."""
    config: PreprocessConfig
    """Preprocessing settings applied."""
    catalog: Catalog
    """Items that survived filtering."""
    user_ids: np.ndarray
    """Raw user id of each user index (str array)."""
    offsets: np.ndarray
    """``items[offsets[u]:offsets[u+1]]`` is user ``u``'s sequence."""
    items: np.ndarray
    """All users' item numbers, concatenated (int64)."""
    timestamps: np.ndarray
    """Timestamp of each entry of ``items`` (float64)."""
    n_raw_interactions: int = 0
    """Interactions in the source before any filtering."""
    _split_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_users(self) -> int:
        """Number of users after filtering."""
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        """Number of items after filtering."""
        return self.catalog.n_items

    @property
    def n_interactions(self) -> int:
        """Number of interactions after filtering."""
        return len(self.items)

    def sequence(self, user: int) -> np.ndarray:
        """Item numbers of user index ``user`` in time order (a read-only view)."""
        if not 0 <= user < self.n_users:
            raise ValueError(f"user={user}; must be in 0..{self.n_users - 1}")
        view = self.items[self.offsets[user] : self.offsets[user + 1]]
        view.flags.writeable = False
        return view

    @cached_property
    def lengths(self) -> np.ndarray:
        """Sequence length of every user."""
        return np.diff(self.offsets)

    @cached_property
    def fingerprint(self) -> str:
        """Hash of the content (items, sequences, titles): checkpoints record it to refuse another dataset."""
        h = hashlib.sha256()
        h.update(self.offsets.tobytes())
        h.update(self.items.tobytes())
        h.update("\x1f".join(self.catalog.raw_ids).encode())
        h.update("\x1f".join(self.catalog.titles).encode())
        return h.hexdigest()[:16]

    def split(self, name: SplitName) -> Split:
        """Leave-one-out split by time: the last item is ``test``, the second last ``valid``.

        ``train`` holds one example per user (the third-last item as target); train the TRM on
        :meth:`train_sequences`, which stops before the valid and test items.
        """
        if name not in SPLITS:
            raise ValueError(f"split={name!r}; must be one of {SPLITS}")
        if name not in self._split_cache:
            back = {"test": 1, "valid": 2, "train": 3}[name]
            ok = self.lengths > back
            users = np.flatnonzero(ok)
            ends = self.offsets[1:][ok] - back
            self._split_cache[name] = Split(name=name, dataset=self, users=users, positions=ends)
        return self._split_cache[name]

    def user_group(self, group: UserGroup, share: float = 0.5, seed: int = 0) -> np.ndarray:
        """Sorted user indices of ``group``: ``"all"``, ``"rl"`` or ``"eval"``.

        ``rl`` is a seeded share of the users, reserved for training a policy; ``eval`` is the others, so
        the two never share a user.

        >>> ds = synthetic(n_users=10, n_items=20, seed=0)
        >>> rl, ev = ds.user_group("rl"), ds.user_group("eval")
        >>> len(rl), len(ev), set(rl) & set(ev)
        (5, 5, set())
        """
        if group not in USER_GROUPS:
            raise ValueError(f"group={group!r}; must be one of {USER_GROUPS}")
        if not 0 < share < 1:
            raise ValueError(f"share={share}; must be in (0, 1)")
        if group == "all":
            return np.arange(self.n_users)
        order = np.random.default_rng(seed).permutation(self.n_users)
        n_rl = int(round(share * self.n_users))
        return np.sort(order[:n_rl] if group == "rl" else order[n_rl:])

    def train_sequences(self) -> list[np.ndarray]:
        """Every user's sequence without its valid and test items (for training a recommender)."""
        return [self.items[self.offsets[u] : self.offsets[u + 1] - 2] for u in range(self.n_users)]

    @cached_property
    def item_popularity(self) -> np.ndarray:
        """Interaction count of each item number in the training sequences (index 0 is padding)."""
        train = np.concatenate(self.train_sequences()) if self.n_users else np.zeros(0, np.int64)
        return np.bincount(train, minlength=self.catalog.num_embeddings)

    def summary(self) -> str:
        """Readable description: counts after filtering, split sizes and settings."""
        c = self.config
        lines = [
            f"dataset      {self.name}  (fingerprint {self.fingerprint})",
            f"source       {self.source}",
            "filtering    implicit feedback"
            + (f", rating >= {c.min_rating}" if c.min_rating is not None else "")
            + (", duplicates dropped" if c.drop_duplicates else "")
            + f", iterated {c.min_user_count}-core users / {c.min_item_count}-core items",
            f"users        {self.n_users:,}",
            f"items        {self.n_items:,}",
            f"interactions {self.n_interactions:,} after filtering (of {self.n_raw_interactions:,} raw)",
            f"density      {self.n_interactions / max(1, self.n_users * self.n_items):.4%}",
            f"seq length   mean {self.lengths.mean():.1f}, median {np.median(self.lengths):.0f}, "
            f"min {self.lengths.min()}, max {self.lengths.max()}",
            "split        leave-one-out by time (ties keep file row order): "
            + ", ".join(f"{s} {len(self.split(s)):,} users" for s in SPLITS),
            f"train items  {int(self.lengths.sum() - 2 * self.n_users):,} interactions for training a recommender",
            f"history      last {c.max_history} items before the target",
        ]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"RecDataset({self.name!r}, users={self.n_users}, items={self.n_items}, interactions={self.n_interactions})"
        )


@dataclass(frozen=True, eq=False)
class Split:
    """One example per user: a target item and the history that precedes it."""

    name: str
    """"train", "valid" or "test"."""
    dataset: RecDataset
    """The dataset this split views."""
    users: np.ndarray
    """User index of each example."""
    positions: np.ndarray
    """Index into ``dataset.items`` of each example's target."""

    def __len__(self) -> int:
        return len(self.users)

    @cached_property
    def targets(self) -> np.ndarray:
        """Target item number of each example."""
        return self.dataset.items[self.positions]

    def history(self, i: int, max_len: int | None = None) -> np.ndarray:
        """Items before example ``i``'s target, oldest first, at most ``max_len`` (default: the config's window)."""
        if not 0 <= i < len(self):
            raise ValueError(f"example {i} out of range 0..{len(self) - 1}")
        window = self.dataset.config.max_history if max_len is None else max_len
        start = max(int(self.dataset.offsets[self.users[i]]), int(self.positions[i]) - window)
        return self.dataset.items[start : self.positions[i]]

    def histories(self, max_len: int | None = None, index: np.ndarray | None = None) -> np.ndarray:
        """Left-padded ``(n, max_len)`` int64 matrix of histories (0 = padding), for batched models."""
        window = self.dataset.config.max_history if max_len is None else max_len
        rows = np.arange(len(self)) if index is None else np.asarray(index)
        out = np.zeros((len(rows), window), dtype=np.int64)
        for r, i in enumerate(rows):
            h = self.history(int(i), window)
            if len(h):
                out[r, window - len(h) :] = h
        return out

    def for_users(self, users: np.ndarray) -> Split:
        """The examples of ``users`` only (a new split; example indices are renumbered)."""
        keep = np.isin(self.users, np.asarray(users))
        return Split(name=self.name, dataset=self.dataset, users=self.users[keep], positions=self.positions[keep])

    def example(self, user: int) -> int:
        """Example index of user index ``user`` in this split."""
        j = np.searchsorted(self.users, user)
        if j >= len(self.users) or self.users[j] != user:
            raise ValueError(f"user {user} has no example in the {self.name} split")
        return int(j)


# ----------------------------------------------------------------------------------------------
# Synthetic data for tests

_ADJ = "Crimson Silent Golden Hidden Broken Electric Frozen Wild Lost Bright Dark Iron Velvet Paper".split()
_NOUN = "Harbor River Empire Garden Signal Voyage Mirror Forest Engine Castle Horizon Letter Comet".split()
_GENRES = "Action Comedy Drama Horror Romance Sci-Fi Thriller Documentary Animation Western".split()


def synthetic(
    n_users: int = 200,
    n_items: int = 100,
    seed: int = 0,
    *,
    n_categories: int = 6,
    seq_len: tuple[int, int] = (8, 30),
    loyalty: float = 0.8,
    config: PreprocessConfig | None = None,
) -> RecDataset:
    """A small dataset with learnable structure, for tests.

    Each item has one or two of ``n_categories`` genres and a unique title; each user prefers one
    genre (a share ``loyalty`` of their items come from it, popular items more often) and drifts between
    two genres over time. A low ``loyalty`` makes the next item's genre hard to guess from the history
    (what a preference can then tell). Timestamps repeat within a user now and then, to exercise tie-breaking.
    Filtering uses ``config`` (default: no k-core, so sizes are exact).
    """
    if n_users < 1 or n_items < 2:
        raise ValueError(f"n_users={n_users}, n_items={n_items}; need n_users >= 1 and n_items >= 2")
    if not 1 <= n_categories <= len(_GENRES):
        raise ValueError(f"n_categories={n_categories}; must be in 1..{len(_GENRES)}")
    if not 0 <= loyalty <= 1:
        raise ValueError(f"loyalty={loyalty}; must be in [0, 1]")
    lo, hi = seq_len
    if not 4 <= lo <= hi:
        raise ValueError(f"seq_len={seq_len}; need 4 <= min <= max")
    rng = np.random.default_rng(seed)
    genres = _GENRES[:n_categories]
    primary = np.arange(n_items) % n_categories
    second = rng.integers(0, n_categories, n_items)
    meta = {}
    for j in range(n_items):
        cats = [genres[primary[j]]]
        if second[j] != primary[j] and rng.random() < 0.4:
            cats.append(genres[second[j]])
        title = f"{_ADJ[j % len(_ADJ)]} {_NOUN[(j // len(_ADJ)) % len(_NOUN)]} {j // (len(_ADJ) * len(_NOUN)) + 1}"
        meta[f"i{j}"] = (title, tuple(cats))
    popularity = rng.zipf(1.6, n_items).clip(max=50).astype(float)
    by_genre = [np.flatnonzero(primary == g) for g in range(n_categories)]
    users, items, ts = [], [], []
    for u in range(n_users):
        fav, other = rng.choice(n_categories, size=2, replace=n_categories == 1)
        length = int(rng.integers(lo, hi + 1))
        t = int(rng.integers(1_000_000, 2_000_000))
        for step in range(length):
            g = fav if rng.random() < loyalty else (other if step > length // 2 else rng.integers(n_categories))
            pool = by_genre[g] if len(by_genre[g]) else np.arange(n_items)
            p = popularity[pool] / popularity[pool].sum()
            users.append(f"u{u}")
            items.append(f"i{int(rng.choice(pool, p=p))}")
            t += int(rng.integers(0, 3))  # 0 gives a tie with the previous interaction
            ts.append(t)
    raw = RawData(
        users=np.asarray(users),
        items=np.asarray(items),
        timestamps=np.asarray(ts, dtype=np.float64),
        ratings=np.ones(len(users)),
        meta=meta,
        files=(),
    )
    cfg = config or PreprocessConfig(min_user_count=0, min_item_count=0)
    return preprocess(
        raw, cfg, name="synthetic", source=f"synthetic(n_users={n_users}, n_items={n_items}, seed={seed})"
    )


# ----------------------------------------------------------------------------------------------
# Cache and the public loader


def cache_dir() -> Path:
    """Cache folder: ``$DEEPREC_CACHE`` or ``~/.cache/deeprec_env``."""
    return Path(os.environ.get("DEEPREC_CACHE") or Path.home() / ".cache" / "deeprec_env")


def _cache_key(kind: str, files: list[Path], config: PreprocessConfig) -> str:
    parts = {"v": CACHE_VERSION, "kind": kind, "config": asdict(config), "files": []}
    for f in files:
        st = f.stat()
        parts["files"].append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _save(ds: RecDataset, path: Path) -> None:
    c = ds.catalog
    header = {
        "name": ds.name,
        "source": ds.source,
        "config": asdict(ds.config),
        "n_raw_interactions": ds.n_raw_interactions,
    }

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                header=np.asarray(json.dumps(header)),
                user_ids=ds.user_ids.astype(str),
                offsets=ds.offsets,
                items=ds.items,
                timestamps=ds.timestamps,
                raw_ids=np.asarray(c.raw_ids[1:], dtype=str),
                titles=np.asarray(c.titles[1:], dtype=str),
                categories=np.asarray(["\x1f".join(x) for x in c.categories[1:]], dtype=str),
            )

    atomic_write(path, write)


def _load(path: Path) -> RecDataset:
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(str(z["header"]))
        catalog = Catalog.from_items(
            [str(x) for x in z["raw_ids"]],
            [str(x) for x in z["titles"]],
            [tuple(x.split("\x1f")) if x else () for x in map(str, z["categories"])],
        )
        return RecDataset(
            name=header["name"],
            source=header["source"],
            config=PreprocessConfig(**header["config"]),
            catalog=catalog,
            user_ids=z["user_ids"],
            offsets=z["offsets"],
            items=z["items"],
            timestamps=z["timestamps"],
            n_raw_interactions=header["n_raw_interactions"],
        )


def load_dataset(
    name: str = "ml-100k",
    path: str | os.PathLike | None = None,
    *,
    config: PreprocessConfig | None = None,
    metadata: str | os.PathLike | None = None,
    cache: bool = True,
) -> RecDataset:
    """Load and preprocess a dataset; processed results are cached on disk (atomic writes).

    Args:
        name: ``"ml-100k"`` (embedded default, from the ``recbole`` package), ``"ml-1m"`` (folder
            with ``ratings.dat``/``movies.dat``), ``"amazon"`` (reviews JSON lines; pass the
            metadata file as ``metadata``), ``"atomic"`` (a RecBole ``.inter`` file, or a folder
            holding ``<name>.inter`` and ``<name>.item``) or ``"synthetic"``.
        path: File or folder for every name but ``ml-100k`` and ``synthetic``.
        config: Preprocessing settings (default: ``docs/evaluation.md``).
        metadata: Item metadata file for ``amazon`` (or ``.item`` file for ``atomic``).
        cache: Read and write the processed cache under :func:`cache_dir`.

    Raises:
        DataFormatError: a file is missing or malformed, or nothing survives filtering.
        ValueError: an unknown name or a missing ``path``.
    """
    config = config or PreprocessConfig()
    if name == "synthetic":
        return synthetic(config=config)
    if name == "ml-100k":
        folder = sources.recbole_ml100k_dir()
        files = [folder / "ml-100k.inter", folder / "ml-100k.item"]
        reader = lambda: sources.read_atomic(*files)  # noqa: E731
        source = f"recbole package: {folder}"
    else:
        if path is None:
            raise ValueError(f"dataset {name!r} needs path=<file or folder>")
        p = Path(path)
        if name == "ml-1m":
            files = [p / "ratings.dat", p / "movies.dat"]
            reader = lambda: sources.read_ml1m(p)  # noqa: E731
        elif name == "amazon":
            if metadata is None:
                raise ValueError("dataset 'amazon' needs metadata=<item metadata JSON lines file>")
            files = [p, Path(metadata)]
            reader = lambda: sources.read_amazon(p, metadata)  # noqa: E731
        elif name == "atomic":
            if p.is_dir():
                inter = sorted(p.glob("*.inter"))
                if len(inter) != 1:
                    raise DataFormatError(f"{p}: expected exactly one .inter file, found {len(inter)}")
                item = inter[0].with_suffix(".item")
                files = [inter[0]] + ([item] if item.is_file() else [])
            else:
                files = [p] + ([Path(metadata)] if metadata is not None else [])
            reader = lambda: sources.read_atomic(*files)  # noqa: E731
        else:
            raise ValueError(f"dataset {name!r} unknown; use ml-100k, ml-1m, amazon, atomic or synthetic")
        source = ", ".join(str(f) for f in files)
        name = name if name != "atomic" else f"atomic:{files[0].stem}"
    for f in files:
        if not f.is_file():
            raise DataFormatError(f"{f}: file not found (dataset {name!r})")
    entry = cache_dir() / "datasets" / f"{name.replace(':', '_')}-{_cache_key(name, files, config)}.npz"
    if cache and entry.is_file():
        try:
            return _load(entry)
        except Exception as e:  # truncated or corrupt (BadZipFile, EOFError, ...): rebuild it
            discard(entry, e, "processed-dataset cache entry")
    ds = preprocess(reader(), config, name=name, source=source)
    if cache:
        _save(ds, entry)
    return ds
