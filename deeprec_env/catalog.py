"""The item vocabulary: raw ids <-> integer ids, item text, and grounding of free-text titles.

Item numbers run from 1 to ``n_items``; 0 is padding. The catalogue is the only place where an
item's title or categories live: the TRM, the index, the rewards and the metrics all take ids.
"""

from __future__ import annotations

import difflib
import html
import re
import unicodedata
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np

PAD = "<pad>"
_YEAR = re.compile(r"\s*\((\d{4})\)\W*$")
_ARTICLE_SUFFIX = re.compile(r"^(.*), (the|a|an|les|la|le|il|el|das|der|die)$", re.IGNORECASE)
_NON_WORD = re.compile(r"[^0-9a-z]+")


def clean_text(text: str) -> str:
    r"""Unescape HTML entities, normalise Unicode (NFC) and collapse white space.

    >>> clean_text("  Tom &amp; Jerry\n ")
    'Tom & Jerry'
    """
    text = unicodedata.normalize("NFC", html.unescape(text))
    return " ".join(text.split())


def normalise_title(title: str) -> str:
    """Key used to match titles loosely: lower case, year dropped, "X, The" -> "the X", no punctuation.

    >>> normalise_title("Matrix, The (1999)")
    'the matrix'
    >>> normalise_title("the   MATRIX!")
    'the matrix'
    """
    text = unicodedata.normalize("NFKD", clean_text(title)).encode("ascii", "ignore").decode()
    text = _YEAR.sub("", text).strip()
    m = _ARTICLE_SUFFIX.match(text)
    if m:
        text = f"{m.group(2)} {m.group(1)}"
    return _NON_WORD.sub(" ", text.lower()).strip()


@dataclass(frozen=True, eq=False)
class Catalog:
    """Items of one dataset; index ``i`` of every tuple describes item number ``i`` (0 = padding).

    Build one with :meth:`from_items`; the fields are parallel tuples so that the object is immutable.
    """

    raw_ids: tuple[str, ...]
    """Raw item id of each item number; ``raw_ids[0]`` is the padding marker."""
    titles: tuple[str, ...]
    """Display title of each item (what the LLM reads and writes)."""
    categories: tuple[tuple[str, ...], ...]
    """Categories (genres) of each item, in source order."""

    def __post_init__(self) -> None:
        if not (len(self.raw_ids) == len(self.titles) == len(self.categories)):
            raise ValueError(
                f"raw_ids ({len(self.raw_ids)}), titles ({len(self.titles)}) and categories "
                f"({len(self.categories)}) must have the same length"
            )
        if not self.raw_ids or self.raw_ids[0] != PAD:
            raise ValueError(f"raw_ids[0] must be the padding marker {PAD!r}; use Catalog.from_items")

    @classmethod
    def from_items(cls, raw_ids: list[str], titles: list[str], categories: list[tuple[str, ...]]) -> Catalog:
        """Build a catalogue from items listed in number order (item 1 first)."""
        if len(set(raw_ids)) != len(raw_ids):
            raise ValueError("raw item ids must be unique")
        return cls(
            raw_ids=(PAD, *raw_ids),
            titles=("", *titles),
            categories=((), *[tuple(c) for c in categories]),
        )

    @property
    def n_items(self) -> int:
        """Number of real items (padding excluded)."""
        return len(self.raw_ids) - 1

    @property
    def num_embeddings(self) -> int:
        """Rows an embedding table over this catalogue needs (``n_items + 1``, row 0 = padding)."""
        return len(self.raw_ids)

    @cached_property
    def _number_of(self) -> dict[str, int]:
        return {raw: i for i, raw in enumerate(self.raw_ids) if i > 0}

    def number(self, raw: str, missing: Literal["error", "none"] = "error") -> int | None:
        """Item number of a raw id; ``missing="none"`` returns None for an unknown id."""
        i = self._number_of.get(raw)
        if i is None and missing == "error":
            raise KeyError(f"unknown raw item id {raw!r}; the catalogue has {self.n_items} items")
        return i

    def check(self, item: int) -> int:
        """Return ``item`` if it is a valid item number, else raise ``ValueError``."""
        if not 1 <= int(item) <= self.n_items:
            raise ValueError(f"item={item}; must be in 1..{self.n_items}")
        return int(item)

    def text(self, item: int) -> str:
        """Metadata sentence fed to the text encoder: ``"Title. Categories: a, b."``."""
        cats = ", ".join(self.categories[item])
        return f"{self.titles[item]}. Categories: {cats}." if cats else f"{self.titles[item]}."

    @cached_property
    def texts(self) -> tuple[str, ...]:
        """:meth:`text` of every item number, padding (empty) included."""
        return ("", *(self.text(i) for i in range(1, len(self.raw_ids))))

    @cached_property
    def all_categories(self) -> tuple[str, ...]:
        """Distinct categories, most frequent first (ties by name)."""
        counts: dict[str, int] = {}
        for cats in self.categories:
            for c in cats:
                counts[c] = counts.get(c, 0) + 1
        return tuple(sorted(counts, key=lambda c: (-counts[c], c)))

    @cached_property
    def category_matrix(self) -> np.ndarray:
        """Boolean ``(num_embeddings, len(all_categories))`` item-by-category matrix."""
        col = {c: j for j, c in enumerate(self.all_categories)}
        m = np.zeros((self.num_embeddings, len(col)), dtype=bool)
        for i, cats in enumerate(self.categories):
            for c in cats:
                m[i, col[c]] = True
        return m

    @cached_property
    def charset(self) -> frozenset[str]:
        """Every character used by a title or a category."""
        chars: set[str] = set()
        for t in self.titles:
            chars.update(t)
        for cats in self.categories:
            for c in cats:
                chars.update(c)
        return frozenset(chars)

    @cached_property
    def _exact(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in range(1, len(self.titles)):
            out.setdefault(self.titles[i], i)
        return out

    @cached_property
    def _normalised(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in range(1, len(self.titles)):
            out.setdefault(normalise_title(self.titles[i]), i)
        return out

    @cached_property
    def _word_index(self) -> dict[str, list[str]]:
        index: dict[str, list[str]] = {}
        for key in self._normalised:
            for w in set(key.split()):
                index.setdefault(w, []).append(key)
        return index

    def _fuzzy_candidates(self, key: str, limit: int = 200) -> list[str]:
        """Normalised titles sharing the most words with ``key`` (rare words count more)."""
        score: dict[str, float] = {}
        for w in set(key.split()):
            keys = self._word_index.get(w, ())
            for k in keys:
                score[k] = score.get(k, 0.0) + 1.0 / len(keys)
        return sorted(score, key=lambda k: (-score[k], k))[:limit]

    def ground(self, title: str, *, fuzzy_cutoff: float = 0.9) -> int | None:
        """Map a free-text title to an item number: exact, then normalised, then fuzzy match.

        Titles shared by several items resolve to the lowest item number. The fuzzy step compares the
        normalised key with difflib's ratio and accepts the best match at or above ``fuzzy_cutoff``
        (set it above 1 to disable fuzzy matching) among the titles that share a word with it, so the
        cost does not grow with the catalogue. Returns None when nothing matches.
        """
        if not isinstance(title, str):
            raise TypeError(f"title must be str, got {type(title).__name__}")
        text = clean_text(title)[:512]
        hit = self._exact.get(text)
        if hit is not None:
            return hit
        key = normalise_title(text)
        if not key:
            return None
        hit = self._normalised.get(key)
        if hit is not None or fuzzy_cutoff > 1.0:
            return hit
        close = difflib.get_close_matches(key, self._fuzzy_candidates(key), n=1, cutoff=fuzzy_cutoff)
        return self._normalised[close[0]] if close else None

    def describe(self, item: int) -> str:
        """Short human-readable line for an item: ``"Title [a, b]"``."""
        return f"{self.titles[item]} [{', '.join(self.categories[item])}]"
