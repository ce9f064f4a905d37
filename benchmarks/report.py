"""Write the results sections of README.md and docs/benchmarks.md from ``benchmarks/results/*.md``.

Those files are what the benchmark scripts printed; the README shows the agent comparison, the docs
page every table.

python -m benchmarks.report
"""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks.common import RESULTS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs" / "benchmarks.md"
PAGES = {README: ("main",), DOCS: None}
"""Which sections each page shows (None: all), between its result markers."""
START, END = "<!-- results:start -->", "<!-- results:end -->"
SWEEP = ("default", "lr=0.003,temperature=0.07", "temperature=0.07", "lr=0.003")
"""The settings of the committed TRM sweep: today's defaults, the previous ones (lr 3e-3, temperature 0.07) and each
of the two changes alone."""
SECTIONS = [
    ("main", "python -m benchmarks.main --out benchmarks/results   # make demo runs the same into runs/main"),
    ("trm_quality", "python -m benchmarks.trm_quality"),
    ("trm_sweep", "python -m benchmarks.trm_sweep " + " ".join(SWEEP)),
    ("reward_probe", "python -m benchmarks.reward_probe"),
    ("curriculum_runs", "python -m benchmarks.curriculum_runs   # every committed benchmarks.curriculum_cpu run"),
    (
        "rl_headroom",
        "python -m benchmarks.rl_headroom --model runs/curriculum-cpu/warmstart/checkpoint "
        "agents/adapters/smollm2-deeprec   # the first: python -m benchmarks.curriculum_cpu's warm start",
    ),
    ("retrieval_speed", "python -m benchmarks.retrieval_speed"),
    ("env_speed", "python -m benchmarks.env_speed"),
    ("llm_speed", "python -m benchmarks.llm_speed"),
    ("update_speed", "python -m benchmarks.update_speed"),
    ("update_memory", "python -m benchmarks.update_memory"),
    ("fuzz", "python -m benchmarks.fuzz"),
    ("openenv_load", "python -m benchmarks.openenv_load"),
    ("trl_grpo", "python -m benchmarks.trl_grpo   # runs examples/trl_grpo.py"),
]
TIMED = ("retrieval_speed", "env_speed", "llm_speed", "update_speed", "openenv_load")
"""Sections whose every figure is a time or a rate: only their layout is deterministic."""
_TIME_COLUMN = re.compile(r"(seconds|_s$|\bs/|/s\b|_ms|\bms\b|wall|time)", re.IGNORECASE)
_NUMBER = re.compile(r"\d[\d,]*(\.\d+)?")


def section(results: Path = RESULTS, names: tuple[str, ...] | None = None, images: str = "benchmarks/results") -> str:
    """The markdown between a page's result markers: the sections ``names`` (default all)."""
    parts = []
    for name, command in SECTIONS:
        if names is not None and name not in names:
            continue
        md = results / f"{name}.md"
        if not md.is_file():
            continue
        body = md.read_text().strip()
        body = re.sub(r"^## ", "### ", body, flags=re.M)
        parts.append(f"```bash\n{command}\n```\n\n{body}")
        if (results / f"{name}.png").is_file():
            parts.append(f"![{name}]({images}/{name}.png)")
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


def page_section(page: Path) -> str:
    """What ``page`` should hold between its result markers."""
    images = "benchmarks/results" if page.parent == ROOT else "../benchmarks/results"
    return section(RESULTS, PAGES[page], images)


def current_section(page: Path) -> str:
    """What ``page`` holds between its result markers now."""
    text = page.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{page} has no {START} ... {END} markers")
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def main() -> None:
    for page in PAGES:
        text = page.read_text()
        current_section(page)  # checks the markers
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        page.write_text(f"{head}{START}\n{page_section(page)}\n{END}{tail}")
        print(f"updated {page}")


if __name__ == "__main__":
    main()
