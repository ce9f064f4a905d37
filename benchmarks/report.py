"""Write the README's results section from ``benchmarks/results/*.md`` (what the scripts printed).

python -m benchmarks.report
"""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks.common import RESULTS

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
SECTIONS = [
    ("main", "python -m benchmarks.main --out benchmarks/results   # make demo runs the same into runs/main"),
    ("trm_quality", "python -m benchmarks.trm_quality"),
    ("retrieval_speed", "python -m benchmarks.retrieval_speed"),
    ("env_speed", "python -m benchmarks.env_speed"),
    ("llm_speed", "python -m benchmarks.llm_speed"),
]
TIMED = ("retrieval_speed", "env_speed", "llm_speed")
"""Sections whose every figure is a time or a rate: only their layout is deterministic."""
_TIME_COLUMN = re.compile(r"(seconds|_s$|\bs/|/s\b|_ms|\bms\b|wall|time)", re.IGNORECASE)
_NUMBER = re.compile(r"\d[\d,]*(\.\d+)?")


def section(results: Path = RESULTS) -> str:
    """The markdown between the README's result markers."""
    parts = []
    for name, command in SECTIONS:
        md = results / f"{name}.md"
        if not md.is_file():
            continue
        body = md.read_text().strip()
        body = re.sub(r"^## ", "### ", body, flags=re.M)
        parts.append(f"```bash\n{command}\n```\n\n{body}")
        if (results / f"{name}.png").is_file():
            parts.append(f"![{name}](benchmarks/results/{name}.png)")
    return "\n\n".join(parts)


def deterministic(text: str) -> str:
    """``text`` (a results section) with every wall time masked: what a rerun of the same commands keeps.

    Table cells under a time column (seconds, ``*_s``, ``*_ms``, rates per second) become ``#``; in the
    speed sections every number does; protocol lines that state a time are masked the same way.
    """
    out, timed, header = [], False, None
    for line in text.splitlines():
        if line.startswith("### "):
            timed = any(line.lower().startswith(f"### {n.replace('_', ' ')}") for n in TIMED) or "speed" in line.lower()
        if line.startswith("|") and not line.startswith("|---"):
            cells = line.strip().strip("|").split("|")
            if header is None:
                header = [c.strip() for c in cells]
            elif len(cells) == len(header):
                cells = [
                    _NUMBER.sub("#", c) if timed or _TIME_COLUMN.search(h) else c
                    for c, h in zip(cells, header, strict=True)
                ]
            line = "|" + "|".join(cells) + "|"
        elif not line.startswith("|"):
            header = None
            if timed or _TIME_COLUMN.search(line.split(":", 1)[0]):
                line = _NUMBER.sub("#", line)
        out.append(line)
    return "\n".join(out)


def main() -> None:
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{README} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{section()}\n{END}{tail}")
    print(f"updated {README}")


if __name__ == "__main__":
    main()
