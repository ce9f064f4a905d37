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
    ("main", "make demo   # or: python -m benchmarks.main [--users N --llm-users N --model ID --device cuda]"),
    ("trm_quality", "python -m benchmarks.trm_quality"),
    ("retrieval_speed", "python -m benchmarks.retrieval_speed"),
    ("env_speed", "python -m benchmarks.env_speed"),
    ("llm_speed", "python -m benchmarks.llm_speed"),
]


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
