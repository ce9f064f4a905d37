"""Type checks for the configuration dataclasses, from their annotations.

Every settings dataclass calls :func:`check_fields` first in its ``__post_init__``: ints are ints (not
bools, floats or strings), floats are finite numbers, ``Literal`` fields take one of their values, a
:data:`Device` field names a torch device, and a nested configuration given as a dict is converted to
its class. The error names the field, the value and what was expected. Range checks (``>= 1``, ...) stay
in each class. Whether this machine has a named device is asked where the device is used
(:func:`torch_device`): a settings object may describe a run for another machine.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from functools import cache
from typing import Annotated, Any, Literal, Union


class _DeviceName(str):
    """The marker of :data:`Device` (``Annotated`` metadata)."""


Device = Annotated[str, _DeviceName("torch device")]
"""A settings field naming a torch device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ..."""
Dtype = Literal["float32", "bfloat16", "float16"]
"""A settings field naming a model's floating-point dtype."""
DTYPES: tuple[str, ...] = typing.get_args(Dtype)


def check_device(device, where: str = "device") -> None:
    """A ValueError unless ``device`` is a ``torch.device`` or a name torch reads as one (on any machine)."""
    import torch

    if isinstance(device, torch.device):
        return
    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        expected = "expected a torch device such as 'cpu', 'cuda', 'cuda:1' or 'mps'"
        raise ValueError(f"{where}={device!r}; {expected}") from None


def torch_device(device, where: str = "device"):
    """``torch.device(device)``, or a ValueError when torch cannot use it on this machine.

    A CUDA device needs a CUDA build of torch and a visible GPU of that index, an MPS device Apple's backend:
    without this check torch fails later, and accelerate and stable-baselines3 quietly run on the CPU instead.
    """
    import torch

    check_device(device, where)
    d = torch.device(device)
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"{where}={str(device)!r}, but torch {torch.__version__} sees no CUDA device (a CPU "
                             "build of torch, or no GPU visible): install a CUDA build of torch (README: TORCH_SPEC) "
                             "or use 'cpu'")  # fmt: skip
        if d.index is not None and d.index >= n:
            raise ValueError(f"{where}={str(device)!r}, but torch sees {n} CUDA device(s): cuda:0 to cuda:{n - 1}")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{where}={str(device)!r}, but torch's MPS backend is not available on this machine")
    return d


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def device_fields(cls: type) -> list[str]:
    """The fields of dataclass ``cls`` annotated :data:`Device`."""
    hints = _hints(cls)
    return [f.name for f in dataclasses.fields(cls) if _is_device(hints[f.name])]


def _is_device(tp) -> bool:
    return typing.get_origin(tp) is Annotated and any(isinstance(m, _DeviceName) for m in typing.get_args(tp)[1:])


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, where: str):
    """``value`` checked against ``tp`` (a dict converted to a nested dataclass); raises TypeError/ValueError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        value = _convert(value, typing.get_args(tp)[0], where)
        if _is_device(tp):
            check_device(value, where)
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, where)
            except (TypeError, ValueError) as e:
                errors.append(e)
        raise TypeError(f"{where}={value!r} ({type(value).__name__}); expected {_describe(tp)}")
    if tp is type(None):
        if value is not None:
            raise TypeError(f"{where}={value!r}; expected None")
        return value
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            raise ValueError(f"{where}={value!r}; must be {_describe(tp)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where}={value!r} ({type(value).__name__}); expected a bool")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}={value!r} ({type(value).__name__}); expected an int")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{where}={value!r} ({type(value).__name__}); expected a number")
        if not math.isfinite(value):
            raise ValueError(f"{where}={value!r}; must be finite")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"{where}={value!r} ({type(value).__name__}); expected a str")
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            try:
                return tp(**value)  # its own __post_init__ checks the fields
            except (TypeError, ValueError) as e:
                raise type(e)(f"{where}: {e}") from None
        raise TypeError(f"{where}={value!r} ({type(value).__name__}); expected a {tp.__name__} or a dict of its fields")
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise TypeError(f"{where}={value!r} ({type(value).__name__}); expected a dict")
        return {_convert(k, key_tp, f"{where} key"): _convert(v, value_tp, f"{where}[{k!r}]") for k, v in value.items()}
    if origin in (tuple, list):
        if not isinstance(value, tuple | list):
            raise TypeError(f"{where}={value!r} ({type(value).__name__}); expected a {origin.__name__}")
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ValueError(f"{where}={value!r}; expected {len(args)} entries")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise TypeError(f"{where}={value!r} ({type(value).__name__}); expected {_describe(tp)}")
    return value


def looks_like_path(name: str | os.PathLike) -> bool:
    """True when a model name is meant as a local path.

    That is a ``PathLike``, or text starting with ``/``, ``.`` or ``~``, or with more than one ``/`` (a hub
    id is ``owner/name``).
    """
    text = str(name)
    return isinstance(name, os.PathLike) or text.startswith(("/", ".", "~")) or text.count("/") > 1


def check_fields(obj) -> None:
    """Check (and, for nested configurations given as dicts, convert) every field of dataclass ``obj``."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        checked = _convert(value, hints[f.name], f"{type(obj).__name__}.{f.name}")
        if checked is not value:
            object.__setattr__(obj, f.name, checked)  # frozen dataclasses too
