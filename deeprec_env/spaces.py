"""The observation space of the text environment: a ``gymnasium.spaces.Text`` that crosses processes.

Gymnasium's ``AsyncVectorEnv`` (with its default ``shared_memory=True``) reads a batch of ``Text``
observations out of shared memory once, when it is built, as a tuple of strings, and hands that same
snapshot back at every step (with gymnasium 1.4: a batch of strings of tab characters). Numeric spaces do
not have the problem because their batch is a numpy view of the buffer. :class:`SharedText` registers
its own shared-memory reader, which returns a live view (:class:`SharedTextBatch`) whose copy, the one
``AsyncVectorEnv`` returns with its default ``copy=True``, is a tuple of the current strings; and a
vectorised writer and reader (numpy instead of one Python call per character).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import read_from_shared_memory, write_to_shared_memory


class SharedText(spaces.Text):
    """``gymnasium.spaces.Text`` (same values, same ``contains``) whose batches work in shared memory."""

    def __init__(self, max_length: int, *, min_length: int = 0, charset: str, seed=None) -> None:
        super().__init__(max_length, min_length=min_length, charset="".join(sorted(set(charset))), seed=seed)
        self._codes = np.array([ord(c) for c in self.character_list], dtype=np.uint32)  # sorted

    def encode(self, text: str) -> np.ndarray:
        """``max_length`` int32 character indices of ``text``, padded with ``len(charset)``."""
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        if len(codes) > self.max_length:
            raise ValueError(f"observation of {len(codes)} characters > max_length {self.max_length}")
        idx = np.searchsorted(self._codes, codes)
        idx = np.minimum(idx, len(self._codes) - 1)
        if not np.array_equal(self._codes[idx], codes):
            bad = sorted({chr(c) for c in codes[self._codes[idx] != codes]})
            raise ValueError(f"observation has characters outside the space's charset: {bad[:10]}")
        out = np.full(self.max_length, len(self._codes), dtype=np.int32)
        out[: len(idx)] = idx
        return out

    def decode(self, indices: np.ndarray) -> str:
        """The text of ``indices`` (padding dropped)."""
        keep = indices[indices < len(self._codes)]
        return self._codes[keep].astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")


class SharedTextBatch(Sequence):
    """A live view of ``n`` texts in shared memory; ``copy.deepcopy`` gives a tuple of the current texts."""

    def __init__(self, space: SharedText, buffer: np.ndarray) -> None:
        self._space = space
        self._buffer = buffer

    def __len__(self) -> int:
        return len(self._buffer)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self._space.decode(row) for row in self._buffer[i])
        return self._space.decode(self._buffer[i])

    def __deepcopy__(self, memo) -> tuple[str, ...]:
        return tuple(self)

    def __eq__(self, other) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, Sequence) else other)

    def __repr__(self) -> str:
        return f"SharedTextBatch({tuple(self)!r})"


@read_from_shared_memory.register(SharedText)
def _read_shared_text(space: SharedText, shared_memory, n: int = 1) -> SharedTextBatch:
    buffer = np.frombuffer(shared_memory.get_obj(), dtype=np.int32).reshape((n, space.max_length))
    return SharedTextBatch(space, buffer)


@write_to_shared_memory.register(SharedText)
def _write_shared_text(space: SharedText, index: int, values: str, shared_memory) -> None:
    size = space.max_length
    destination = np.frombuffer(shared_memory.get_obj(), dtype=np.int32)
    destination[index * size : (index + 1) * size] = space.encode(values)
