"""Files the package writes: atomic, cleaned up after a kill, checked when read, never someone else's.

- :func:`atomic_write` writes a temp file next to the target and renames it over it: a reader sees the
  old file or the new one, never half of one; concurrent writers end with one whole file (the last).
  Files get the permissions the umask gives (temp files start at 0600).
- Temp names carry the writer's pid (``.name.pid123.xxxx.tmp``); :func:`clean_stale_temps` removes those
  whose writer is gone (a killed write), and every writer calls it for its folder.
- :func:`prepare_folder` refuses to write into a folder holding files the writer does not own (a user's
  ``--out runs`` must never lose ``runs/``).
- :func:`discard` logs and removes a corrupt cache entry so that it is rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("deeprec_env")

_TEMP = re.compile(r"^\..+\.pid(\d+)\.[^.]*\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder: Path) -> int:
    """Remove temp files and folders left in ``folder`` by killed writers (their pid is gone); their count."""
    removed = 0
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return 0
    for p in entries:
        m = _TEMP.match(p.name)
        if m and not _alive(int(m.group(1))):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed += 1
    return removed


def temp_path(path: Path, *, folder: bool = False) -> Path:
    """A new temp file (or folder) next to ``path``, named for :func:`clean_stale_temps`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.pid{os.getpid()}."
    if folder:
        return Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=".tmp"))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)``, then rename the temp file over ``path`` (permissions as the umask gives)."""
    path = Path(path)
    clean_stale_temps(path.parent) if path.parent.is_dir() else None
    tmp = temp_path(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def prepare_folder(path: str | os.PathLike, owned: Iterable[str], what: str) -> Path:
    """Create ``path`` or check that everything in it is ``owned`` (or a temp file of ours); never delete.

    Raises:
        FileExistsError: ``path`` is a file, or a folder holding other files.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; {what} needs a folder (a new one, or one it wrote before)")
    if path.is_dir():
        clean_stale_temps(path)
        owned = set(owned)
        foreign = sorted(p.name for p in path.iterdir() if p.name not in owned and not _TEMP.match(p.name))
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise FileExistsError(
                f"{path} holds files that are not {what} ({shown}); nothing was written. Pass a new or empty "
                f"folder (for example {path / 'trm'})"
            )
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def discard(path: str | os.PathLike, error: BaseException, what: str) -> None:
    """Log that the cache entry ``path`` could not be read and remove it (it is rebuilt by the caller)."""
    path = Path(path)
    log.warning("%s %s is unreadable (%s: %s); removing it and rebuilding", what, path, type(error).__name__, error)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars and arrays turned into Python numbers and lists (non-finite floats kept)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value
