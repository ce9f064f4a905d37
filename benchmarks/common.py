"""Helpers shared by the benchmark scripts: protocol stamps, tables and result files."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

import deeprec_env
from deeprec_env.threads import thread_settings

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    """Current commit (with "+dirty" when the tree has changes), or "unknown"."""
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if sha.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def environment() -> dict:
    """Version, commit, machine and time of a run."""
    import os

    return {
        "deeprec_env": deeprec_env.__version__,
        "commit": git_commit(),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "threads": thread_settings(),
    }


def markdown_table(rows: list[dict], columns: list[str], fmt: str = "{:.4f}") -> str:
    """A markdown table of ``rows`` (dicts) restricted to ``columns``; floats use ``fmt``."""
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        cells = [fmt.format(r[c]) if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def protocol_text(protocol: dict) -> str:
    """``key: value`` lines for printing next to a table."""
    return "\n".join(f"- {k}: {v}" for k, v in protocol.items())


def write_results(name: str, payload: dict, markdown: str, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` under ``out_dir`` (default benchmarks/results)."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    js.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    md.write_text(markdown + "\n")
    return js, md


def publish(name: str, title: str, table: str, protocol: dict, data: dict, smoke: bool, out: str | None) -> str:
    """Print ``## title``, the table and the protocol, and write them with ``data`` as results ``name``.

    A smoke run writes ``name_smoke``, and only when ``out`` is given. Returns the markdown.
    """
    text = f"## {title}\n\n{table}\n\nProtocol:\n{protocol_text(protocol)}\n"
    print(text)
    if not smoke or out:
        payload = {"benchmark": name, "protocol": protocol, **environment(), **data}
        js, md = write_results(name + ("_smoke" if smoke else ""), payload, text, out)
        print(f"wrote {js} and {md}")
    return text


def smoke_env_kwargs(encoder: str = "minilm") -> dict:
    """Environment settings of a benchmark's ``--smoke`` run: synthetic data and a one-epoch tiny TRM."""
    from deeprec_env.trm import TRMConfig

    return {
        "encoder": encoder,
        "dataset": "synthetic",
        "trm": TRMConfig(d_model=16, ffn_dim=32, max_len=12, max_epochs=1),
    }
