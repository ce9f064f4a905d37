"""The package's own thread use: fast on a busy machine, and safe after ``fork``.

Two facts decide the design (``docs/design.md``, "Vector environments, processes and threads"):

- The environment's compute is small (one short text through the encoder, one TRM forward, one faiss
  search): extra threads buy nothing and, on a machine whose cores are busy with other work, cost many
  times over in OpenMP spinning and waiting. The environment therefore runs its own torch work with
  ``EnvConfig.threads`` threads (default 1) inside :func:`limit_threads`, which restores the process's
  setting afterwards; faiss searches use ``IndexConfig.threads`` (default 1) the same way.
- GNU OpenMP (torch's and faiss's CPU builds) is not fork-safe: once a process has run a parallel region
  with several threads, a child created by ``fork`` hangs forever in its first parallel region. Importing
  :mod:`deeprec_env` registers a hook that sets torch's and faiss's thread counts to 1 in every forked
  child, so ``AsyncVectorEnv``, stable-baselines3's ``SubprocVecEnv`` and ``multiprocessing`` workers
  run instead of hanging. A child may raise them again with :func:`set_threads` only if its parent never
  ran multi-threaded work (or start the child with ``spawn``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


def _faiss():
    return sys.modules.get("faiss")


def set_threads(torch_threads: int | None = None, faiss_threads: int | None = None) -> None:
    """Set the process-wide torch intra-op and faiss OpenMP thread counts (None leaves one as it is)."""
    for name, value in (("torch_threads", torch_threads), ("faiss_threads", faiss_threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r}; must be an int >= 1 or None")
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    if faiss_threads is not None:
        import faiss

        faiss.omp_set_num_threads(faiss_threads)


def thread_settings() -> dict[str, int | str | None]:
    """The current thread settings, for a benchmark's protocol."""
    import torch

    faiss = _faiss()
    return {
        "torch threads (process)": torch.get_num_threads(),
        "faiss threads (process)": faiss.omp_get_max_threads() if faiss is not None else None,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu cores": os.cpu_count(),
    }


@contextmanager
def limit_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (None: leave the setting), then restore the previous count.

    Switching costs well under a microsecond; the environment wraps each retrieval in it.
    """
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _after_fork_in_child() -> None:
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    faiss = _faiss()
    if faiss is not None:
        faiss.omp_set_num_threads(1)


_REGISTERED = False


def register_fork_hook() -> None:
    """Make forked children single-threaded in torch and faiss (idempotent; done on import)."""
    global _REGISTERED
    if not _REGISTERED and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _REGISTERED = True
