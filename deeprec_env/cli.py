"""Command line: ``deeprec data-summary``, ``deeprec trm-train`` and ``deeprec serve``.

Options of ``trm-train`` are generated from :class:`~deeprec_env.trm.TRMConfig`, those of ``serve`` from
:class:`~deeprec_env.env.EnvConfig`, so the CLI and the library share one set of defaults and one
validation.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Sequence


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: Sequence[str] = ()) -> None:
    """Add one ``--field-name`` option per scalar field of dataclass ``cls`` (defaults from the class).

    Tuples of numbers take a comma-separated list (``--betas 0.9,0.95``). Fields in ``skip`` and fields
    of other types (nested configs) keep their defaults.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        if hint is bool:
            parser.add_argument(flag, type=_parse_bool, default=f.default, metavar="{true,false}")
        elif typing.get_origin(hint) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(hint), default=f.default)
        elif typing.get_origin(hint) is tuple and {a for a in typing.get_args(hint) if a is not ...} <= {int, float}:
            elem = float if float in typing.get_args(hint) else int
            parser.add_argument(flag, type=_tuple_of(elem), default=f.default, metavar="A,B,...")
        else:
            args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            if args[0] in (int, float, str):
                parser.add_argument(flag, type=args[0], default=f.default)


def device_option(text: str) -> str:
    """``type`` of a ``--device`` option: the name of a torch device this machine has, else a usage error."""
    from deeprec_env.config import torch_device

    try:
        torch_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def int_at_least(low: int):
    """``type`` of an integer option with a lower bound (``int_at_least(0)``: a step count that may be 0)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}; must be >= {low}")
        return value

    return parse


positive_int = int_at_least(1)
"""``type`` of a count option (episodes, sessions, ...): an int >= 1, else a usage error."""


def require_device(parser: argparse.ArgumentParser, device: str) -> None:
    """End the program through ``parser.error`` unless this machine has ``--device`` (checked after parsing)."""
    try:
        device_option(device)
    except argparse.ArgumentTypeError as e:
        parser.error(f"argument --device: {e}")


def _tuple_of(elem):
    def parse(text: str) -> tuple:
        try:
            return tuple(elem(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {elem.__name__}") from None

    return parse


def from_args(
    cls, ns: argparse.Namespace, defaults_for: Sequence[str] = (), parser: argparse.ArgumentParser | None = None
):
    """Build dataclass ``cls`` from parsed options (its ``__post_init__`` validates them).

    A command runs here, so a :data:`~deeprec_env.config.Device` field must also name a device this machine has
    (:func:`~deeprec_env.config.torch_device`). With ``parser``, settings refused end the program through
    ``parser.error`` (usage and one line, exit status 2) instead of a traceback.
    """
    from deeprec_env.config import device_fields, torch_device

    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)
              if f.name not in defaults_for and hasattr(ns, f.name)}  # fmt: skip
    try:
        obj = cls(**values)
        for name in device_fields(cls):
            torch_device(getattr(obj, name), f"--{name.replace('_', '-')}")
        return obj
    except ValueError as e:
        if parser is None:
            raise
        parser.error(str(e))


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false)")


def parse_dataclass(cls, argv: Sequence[str] | None, description: str | None):
    """A ``cls`` instance from command-line options (one per field; ``python -m agents.grpo`` and friends)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(ap, cls)
    return from_args(cls, ap.parse_args(argv), parser=ap)


def _dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="ml-100k", help="ml-100k | ml-1m | amazon | atomic | synthetic")
    p.add_argument("--path", default=None, help="file or folder (all datasets but ml-100k and synthetic)")
    p.add_argument("--metadata", default=None, help="item metadata file (amazon) or .item file (atomic)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deeprec`` command."""
    from deeprec_env.env import EnvConfig
    from deeprec_env.trm import TRMConfig

    ap = argparse.ArgumentParser(prog="deeprec", description="deeprec-env command line")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data-summary", help="load a dataset and print its summary")
    _dataset_args(p)
    p = sub.add_parser("trm-train", help="train a preference-aware TRM and save a checkpoint")
    _dataset_args(p)
    p.add_argument("--out", required=True, help="checkpoint folder (model.safetensors + config.json)")
    p.add_argument("--encoder", default="minilm", help="text encoder: 'minilm' (embedded), a path or a hub id")
    add_dataclass_args(p, TRMConfig)
    p = sub.add_parser("serve", help="serve DeepRec over OpenEnv's HTTP/WebSocket API (needs the openenv extra)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-sessions", type=int, default=64, help="concurrent WebSocket sessions")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    add_dataclass_args(p, EnvConfig)
    ns = ap.parse_args(argv)
    try:
        return _run(ns)
    except (ValueError, TypeError, OSError, ImportError) as e:  # bad data, options, files, a missing extra: one line
        if ns.debug:
            raise
        print(f"deeprec {ns.command}: error: {e}", file=sys.stderr)
        print("(run with --debug for the traceback)", file=sys.stderr)
        return 2


def _run(ns: argparse.Namespace) -> int:
    from deeprec_env.data import load_dataset
    from deeprec_env.trm import TRMConfig

    if ns.command == "serve":
        from deeprec_env.env import EnvConfig
        from deeprec_env.openenv_server import serve

        config = from_args(EnvConfig, ns)
        if ns.max_sessions < 1:
            raise ValueError(f"--max-sessions {ns.max_sessions}; must be >= 1")
        if not 1 <= ns.port <= 65535:  # else uvicorn's bind() fails inside its event loop, a traceback
            raise ValueError(f"--port {ns.port}; must be in 1..65535")
        kwargs = {f.name: getattr(ns, f.name) for f in dataclasses.fields(EnvConfig) if hasattr(ns, f.name)}
        print(f"serving DeepRec ({config.dataset}, stage {config.stage}) on http://{ns.host}:{ns.port} (OpenEnv)")
        serve(ns.host, ns.port, ns.max_sessions, **kwargs)
        return 0

    dataset = load_dataset(ns.dataset, ns.path, metadata=ns.metadata)
    if ns.command == "data-summary":
        print(dataset.summary())
        return 0
    from deeprec_env.embed import TextEncoder
    from deeprec_env.storage import prepare_folder
    from deeprec_env.trm import TRM_FILES, save_trm, train_trm

    config = from_args(TRMConfig, ns)
    prepare_folder(ns.out, TRM_FILES, "a TRM checkpoint")  # refuse a foreign folder before training, not after
    encoder = TextEncoder(ns.encoder, device=config.device)
    model, log = train_trm(dataset, config, encoder)
    path = save_trm(model, ns.out, dataset, {"encoder": ns.encoder, "train_log": log})
    print(
        f"saved {path}: best valid NDCG@10 {log['best_valid_ndcg10']:.4f} after {log['epochs_run']} epochs, "
        f"{log['seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
