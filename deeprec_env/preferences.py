"""Natural-language preferences: the texts the TRM learns from, and the probes that test it.

A preference is *evidence* about what the user wants next, which the TRM weighs against the history,
not a filter (``docs/trm.md``). It learns that because its training preferences come from a mixture
of sources, most of which are only partly true of the item the user actually picks next:

=====================  ====================================================================  ==============
source                 text                                                                  about
=====================  ====================================================================  ==============
``none``               no preference                                                         -
``target_categories``  one or two of the target's categories                                the target
``target_era``         the target's decade ("1970s", "from the 1970s")                       the target
``target_like``        "like <title>" of an item often consumed next to the target           near the target
``target_words``       a word of the target's title                                          the target
``history_categories`` the history's top category (or two), or the last item's categories    the user
``history_like``       "like <title>" of one of the last three history items                 the user
``history_era``        the most frequent decade in the history                               the user
``noise``              a random category, decade or title                                    nothing
=====================  ====================================================================  ==============

Each text takes one of several phrasings (the ``*_TEMPLATES`` below), so the channel learns language
rather than exact strings. Everything is derived from what any catalogue has (titles, categories, and a
release year when a title ends in "(YYYY)") and from the training sequences, so it works on every dataset.

The probe functions at the end build one preference per evaluation example for
``python -m benchmarks.trm_quality``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np

from deeprec_env.catalog import Catalog, normalise_title
from deeprec_env.config import check_fields

CATEGORY_TEMPLATES = ("{}", "more {}", "something {}", "in the mood for {}", "the user enjoys {}")
"""Phrasings of one category (the first keeps the catalogue's spelling, the others use lower case)."""
PAIR_TEMPLATES = ("{}; {}", "{} and {}")
"""Phrasings of two categories."""
ERA_TEMPLATES = ("{}s", "from the {}s", "released in the {}s", "something from the {}s")
"""Phrasings of a decade (``{}`` is the decade's first year, e.g. 1970)."""
LIKE_TEMPLATES = ("like {}", "similar to {}", "more like {}", "something like {}")
"""Phrasings of "an item like this one" (the last uses the title without its year)."""
_STOP = frozenset("the a an of and in on to for with from at by la le les el il das der die de du un une".split())
_YEAR = re.compile(r"\s*\((\d{4})\)\s*$")


def title_year(title: str) -> int:
    """The release year in a trailing "(YYYY)" of a title; 0 when there is none.

    >>> title_year("Heat (1995)"), title_year("Heat")
    (1995, 0)
    """
    m = _YEAR.search(title)
    return int(m.group(1)) if m else 0


def item_years(catalog: Catalog) -> np.ndarray:
    """Release year of each item number parsed from its title (:func:`title_year`); 0 when absent."""
    return np.array([title_year(t) if i else 0 for i, t in enumerate(catalog.titles)], dtype=np.int64)


def title_words(title: str) -> list[str]:
    """Content words of a title (lower case, no year, no articles or one-letter words), in order."""
    return [w for w in normalise_title(title).split() if len(w) > 2 and w not in _STOP and not w.isdigit()]


@dataclass(frozen=True)
class PreferenceMix:
    """Share of training positions whose preference comes from each source (normalised to sum to 1).

    The defaults give about a quarter of the preferences that are true of the target, half that describe
    the user's history and a quarter of noise, so that no phrase is ever a guarantee: ``docs/trm.md`` shows
    the probe table they give on ml-100k, and how it moves with the shares.
    """

    none: float = 0.9
    """No preference term. The TRM is trained without a preference at every position anyway (its
    no-preference ranking must stand on its own); a preference term is added where one is drawn. Half the
    positions get one (the other shares sum to 0.9), which halves the cost of the term."""
    target_categories: float = 0.07
    """One of the target's categories (60%) or two of them; never the full list, which is nearly an
    identifier of the item: full lists are learnt from the history (the last item's), where they are only a
    hint."""
    target_era: float = 0.04
    """The target's decade (items whose title has no year get no preference)."""
    target_like: float = 0.06
    """"like <title>" of one of the target's most frequent neighbours in the training sequences."""
    target_words: float = 0.02
    """One content word of the target's title."""
    history_categories: float = 0.30
    """The history's most frequent category (30%), its two most frequent (10%), or the last item's
    categories (60%)."""
    history_like: float = 0.11
    """"like <title>" of one of the last three items of the history."""
    history_era: float = 0.04
    """The most frequent decade among the history's items."""
    noise: float = 0.22
    """A random category, decade or item title, unrelated to user and target."""

    def __post_init__(self) -> None:
        check_fields(self)
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"PreferenceMix.{f.name}={v!r}; must be a finite number >= 0")
        if sum(self.weights.values()) <= 0:
            raise ValueError("PreferenceMix: every share is 0; give at least one source a share > 0")

    @property
    def weights(self) -> dict[str, float]:
        """Share of every source, by name (not normalised)."""
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}

    @property
    def probabilities(self) -> tuple[tuple[str, ...], np.ndarray]:
        """Source names and their normalised probabilities."""
        w = self.weights
        p = np.asarray(list(w.values()), dtype=np.float64)
        return tuple(w), p / p.sum()


@dataclass(frozen=True, eq=False)
class PreferenceBank:
    """Every training preference text of one catalogue, and how to draw one per training position.

    Bank row ``r >= 1`` is ``texts[r - 1]``; row 0 means "no preference". Build one with
    :meth:`build`; :meth:`sample` draws rows for a batch of (target, history) pairs.
    """

    texts: tuple[str, ...]
    """Distinct preference texts."""
    category_rows: np.ndarray
    """``(n_categories, len(CATEGORY_TEMPLATES))`` bank rows of each category's phrasings."""
    pair_rows: np.ndarray
    """``(n_categories, n_categories, len(PAIR_TEMPLATES))`` rows of two categories (0 on the diagonal)."""
    set_rows: np.ndarray
    """``(num_embeddings,)`` row of each item's full category list (0 without categories)."""
    era_rows: np.ndarray
    """``(n_eras, len(ERA_TEMPLATES))`` rows of each decade."""
    item_era: np.ndarray
    """``(num_embeddings,)`` index of each item's decade into ``eras`` (-1: unknown)."""
    eras: tuple[int, ...]
    """Decades present in the catalogue (first year: 1970, ...)."""
    like_rows: np.ndarray
    """``(num_embeddings, len(LIKE_TEMPLATES))`` rows of "like <title>" (0 for padding)."""
    word_offsets: np.ndarray
    """Item ``i``'s title-word rows are ``word_rows[word_offsets[i]:word_offsets[i + 1]]``."""
    word_rows: np.ndarray
    """Rows of single title words."""
    category_matrix: np.ndarray
    """``(num_embeddings, n_categories)`` boolean item-by-category matrix."""
    neighbours: np.ndarray
    """``(num_embeddings, k)`` most frequent neighbours of each item in the sequences (0: none)."""

    @classmethod
    def build(cls, catalog: Catalog, sequences: list[np.ndarray], *, n_neighbours: int = 10) -> PreferenceBank:
        """All phrasings for ``catalog``; item neighbours are counted in ``sequences`` (items at most 3 apart)."""
        texts: dict[str, int] = {}

        def row(text: str) -> int:
            return texts.setdefault(text, len(texts)) + 1

        cats = catalog.all_categories
        n_cat = len(cats)
        category_rows = np.array(
            [[row(t.format(c if j == 0 else c.lower())) for j, t in enumerate(CATEGORY_TEMPLATES)] for c in cats],
            dtype=np.int64,
        ).reshape(n_cat, len(CATEGORY_TEMPLATES))
        pair_rows = np.zeros((n_cat, n_cat, len(PAIR_TEMPLATES)), dtype=np.int64)
        for a in range(n_cat):
            for b in range(a + 1, n_cat):
                pair_rows[a, b] = pair_rows[b, a] = [row(t.format(cats[a], cats[b])) for t in PAIR_TEMPLATES]
        cat_col = {c: j for j, c in enumerate(cats)}
        set_rows = np.zeros(catalog.num_embeddings, dtype=np.int64)
        for i in range(1, catalog.num_embeddings):
            own = sorted(catalog.categories[i], key=cat_col.__getitem__)
            if own:
                set_rows[i] = row("; ".join(own))
        years = item_years(catalog)
        decades = years // 10 * 10
        eras = tuple(sorted({int(d) for d in decades[1:] if d > 0}))
        era_index = {d: j for j, d in enumerate(eras)}
        item_era = np.array([era_index.get(int(d), -1) if d > 0 else -1 for d in decades], dtype=np.int64)
        era_rows = np.array([[row(t.format(d)) for t in ERA_TEMPLATES] for d in eras], dtype=np.int64)
        era_rows = era_rows.reshape(len(eras), len(ERA_TEMPLATES))
        like_rows = np.zeros((catalog.num_embeddings, len(LIKE_TEMPLATES)), dtype=np.int64)
        word_offsets, word_rows = [0], []
        for i in range(1, catalog.num_embeddings):
            title = catalog.titles[i]
            bare = _YEAR.sub("", title) or title
            like_rows[i] = [row(t.format(bare if j == len(LIKE_TEMPLATES) - 1 else title))
                            for j, t in enumerate(LIKE_TEMPLATES)]  # fmt: skip
            word_rows.extend(row(w) for w in dict.fromkeys(title_words(title)))
            word_offsets.append(len(word_rows))
        word_offsets = np.asarray([0, *word_offsets], dtype=np.int64)  # item 0 (padding) has none
        return cls(
            texts=tuple(texts),
            category_rows=category_rows,
            pair_rows=pair_rows,
            set_rows=set_rows,
            era_rows=era_rows,
            item_era=item_era,
            eras=eras,
            like_rows=like_rows,
            word_offsets=word_offsets,
            word_rows=np.asarray(word_rows, dtype=np.int64),
            category_matrix=catalog.category_matrix,
            neighbours=co_occurrence_neighbours(sequences, catalog.num_embeddings, n_neighbours),
        )

    @cached_property
    def _item_categories(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR (offsets, category indices) of each item's categories."""
        counts = self.category_matrix.sum(1)
        return np.r_[0, np.cumsum(counts)].astype(np.int64), np.nonzero(self.category_matrix)[1].astype(np.int64)

    def sample(
        self, mix: PreferenceMix, targets: np.ndarray, contexts: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """One bank row per example (0 = no preference), each drawn from a source of ``mix``.

        Args:
            mix: source shares.
            targets: ``(N,)`` item numbers the examples are trained to predict.
            contexts: ``(N, L)`` the items before each target, right-aligned (most recent in the last
                column), 0 = padding.
            rng: the generator every draw comes from.
        """
        names, p = mix.probabilities
        targets = np.asarray(targets, dtype=np.int64)
        contexts = np.asarray(contexts, dtype=np.int64)
        src = rng.choice(len(names), size=len(targets), p=p)
        rows = np.zeros(len(targets), dtype=np.int64)
        for s, name in enumerate(names):
            idx = np.flatnonzero(src == s)
            if len(idx) and name != "none":
                rows[idx] = getattr(self, f"_{name}")(targets[idx], contexts[idx], rng)
        return rows

    # -- one drawing function per source: (targets, contexts, rng) -> rows ----------------------

    def _pick_template(self, table: np.ndarray, index: np.ndarray, rng) -> np.ndarray:
        """``table[index, random template]``; 0 where ``index`` is -1."""
        if table.shape[0] == 0:
            return np.zeros(len(index), dtype=np.int64)
        t = rng.integers(0, table.shape[1], size=len(index))
        return np.where(index >= 0, table[np.maximum(index, 0), t], 0)

    def _categories_of(self, items: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        """Two distinct random categories of each item (-1 where it has fewer)."""
        off, cat = self._item_categories
        n = off[items + 1] - off[items]
        first = rng.integers(0, np.maximum(n, 1))
        second = (first + 1 + rng.integers(0, np.maximum(n - 1, 1))) % np.maximum(n, 1)
        a = np.where(n >= 1, cat[np.minimum(off[items] + first, len(cat) - 1)], -1)
        b = np.where(n >= 2, cat[np.minimum(off[items] + second, len(cat) - 1)], -1)
        return a, b

    def _category_text(self, a: np.ndarray, b: np.ndarray, full: np.ndarray, items, rng) -> np.ndarray:
        """Rows for one category (``b`` = -1), two, or an item's full list where ``full``."""
        one = self._pick_template(self.category_rows, a, rng)
        t = rng.integers(0, self.pair_rows.shape[2], size=len(a)) if self.pair_rows.size else np.zeros(len(a), int)
        two = self.pair_rows[np.maximum(a, 0), np.maximum(b, 0), t] if self.pair_rows.size else np.zeros(len(a), int)
        rows = np.where(b >= 0, two, one)
        return np.where(full & (self.set_rows[items] > 0), self.set_rows[items], rows)

    def _target_categories(self, targets, contexts, rng):
        a, b = self._categories_of(targets, rng)
        b = np.where(rng.random(len(targets)) < 0.6, -1, b)  # one category 60% of the time, else two
        return self._category_text(a, b, np.zeros(len(targets), dtype=bool), targets, rng)

    def _target_era(self, targets, contexts, rng):
        return self._pick_template(self.era_rows, self.item_era[targets], rng)

    def _target_like(self, targets, contexts, rng):
        nb = self.neighbours[targets]
        n = (nb > 0).sum(1)
        pick = nb[np.arange(len(targets)), rng.integers(0, np.maximum(n, 1))]
        return np.where(n > 0, self._pick_template(self.like_rows, pick, rng), 0)

    def _target_words(self, targets, contexts, rng):
        n = self.word_offsets[targets + 1] - self.word_offsets[targets]
        pick = self.word_offsets[targets] + rng.integers(0, np.maximum(n, 1))
        return np.where(n > 0, self.word_rows[np.minimum(pick, max(len(self.word_rows) - 1, 0))], 0)

    def _history_categories(self, targets, contexts, rng):
        counts = self.category_matrix[contexts].sum(1).astype(np.float64)  # padding (item 0) has none
        noisy = counts + rng.random(counts.shape) * 0.5  # ties broken at random
        order = np.argsort(-noisy, axis=1)
        a = np.where(counts.max(1) > 0, order[:, 0], -1)
        if counts.shape[1] > 1:
            b = np.where(counts[np.arange(len(counts)), order[:, 1]] > 0, order[:, 1], -1)
        else:
            b = np.full(len(counts), -1)
        u = rng.random(len(targets))
        b = np.where(u < 0.3, -1, b)  # the top category 30% of the time, the top two 10%
        last = contexts[:, -1]
        return self._category_text(a, b, u >= 0.4, last, rng)  # the last item's categories 60%

    def _history_like(self, targets, contexts, rng):
        recent = contexts[:, -3:]
        n = (recent > 0).sum(1)
        pick = recent[np.arange(len(targets)), recent.shape[1] - 1 - rng.integers(0, np.maximum(n, 1))]
        return np.where(pick > 0, self._pick_template(self.like_rows, pick, rng), 0)

    def _history_era(self, targets, contexts, rng):
        if not self.eras:
            return np.zeros(len(targets), dtype=np.int64)
        era = self.item_era[contexts]
        counts = np.stack([(era == j).sum(1) for j in range(len(self.eras))], 1).astype(np.float64)
        top = np.argmax(counts + rng.random(counts.shape) * 0.5, axis=1)
        return self._pick_template(self.era_rows, np.where(counts.max(1) > 0, top, -1), rng)

    def _noise(self, targets, contexts, rng):
        n = len(targets)
        kind = rng.integers(0, 3, size=n)
        cat = rng.integers(0, max(len(self.category_rows), 1), size=n) if len(self.category_rows) else -np.ones(n, int)
        era = rng.integers(0, len(self.eras), size=n) if self.eras else -np.ones(n, int)
        item = rng.integers(1, len(self.like_rows), size=n)
        return np.select(
            [kind == 0, kind == 1],
            [self._pick_template(self.category_rows, cat, rng), self._pick_template(self.era_rows, era, rng)],
            self._pick_template(self.like_rows, item, rng),
        )


def co_occurrence_neighbours(sequences: list[np.ndarray], num_embeddings: int, k: int = 10, window: int = 3):
    """``(num_embeddings, k)``: each item's ``k`` most frequent neighbours (items at most ``window`` apart).

    Ties go to the lower item number; rows with fewer neighbours are padded with 0.
    """
    pairs = []
    for s in sequences:
        s = np.asarray(s, dtype=np.int64)
        for d in range(1, window + 1):
            if len(s) > d:
                pairs.append(np.stack([s[:-d], s[d:]], 1))
                pairs.append(np.stack([s[d:], s[:-d]], 1))
    out = np.zeros((num_embeddings, k), dtype=np.int64)
    if not pairs:
        return out
    p = np.concatenate(pairs)
    p = p[p[:, 0] != p[:, 1]]
    keys, counts = np.unique(p[:, 0] * num_embeddings + p[:, 1], return_counts=True)
    a, b = keys // num_embeddings, keys % num_embeddings
    order = np.lexsort((b, -counts, a))  # by item, then most frequent, then lower neighbour id
    a, b = a[order], b[order]
    start = np.searchsorted(a, np.arange(num_embeddings))
    rank = np.arange(len(a)) - start[a]
    keep = rank < k
    out[a[keep], rank[keep]] = b[keep]
    return out


def right_aligned_contexts(windows: np.ndarray) -> np.ndarray:
    """``(B, L) -> (B, L, L)``: for each position ``j``, the items up to ``j``, right-aligned (0 = padding)."""
    b, length = windows.shape
    col = np.arange(length)
    src = col[None, :] - (length - 1) + np.arange(length)[:, None]  # (L positions, L columns)
    take = np.take_along_axis(windows[:, None, :].repeat(length, 1), np.maximum(src, 0)[None].repeat(b, 0), 2)
    return np.where(src[None] >= 0, take, 0)


# ----------------------------------------------------------------------------------------------
# Probes: one preference per evaluation example


def oracle_preference(catalog: Catalog, item: int) -> str:
    """The target's own categories, all of them (privileged: close to an identifier)."""
    return "; ".join(catalog.categories[item])


def wrong_categories(catalog: Catalog, item: int, n: int = 1) -> str:
    """The ``n`` most frequent categories that ``item`` does not have."""
    own = set(catalog.categories[item])
    return "; ".join([c for c in catalog.all_categories if c not in own][:n])


def era_preference(years: np.ndarray, item: int) -> str:
    """The item's decade in words ("from the 1970s"); "" when its year is unknown."""
    return f"from the {years[item] // 10 * 10}s" if years[item] > 0 else ""


def like_preference(catalog: Catalog, neighbours: np.ndarray, item: int) -> str:
    """The text "like <title>" of the item's most frequent neighbour; "" when it has none."""
    nb = int(neighbours[item, 0])
    return f"like {catalog.titles[nb]}" if nb > 0 else ""


def top_history_categories(catalog: Catalog, history: np.ndarray, n: int = 1) -> str:
    """The ``n`` most frequent categories of the history (ties: the more frequent category overall)."""
    counts: dict[str, int] = {}
    for i in history:
        for c in catalog.categories[int(i)]:
            counts[c] = counts.get(c, 0) + 1
    order = {c: j for j, c in enumerate(catalog.all_categories)}
    return "; ".join(sorted(counts, key=lambda c: (-counts[c], order[c]))[:n])
