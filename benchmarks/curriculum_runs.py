"""Every committed CPU stage-2 run in one table: validation NDCG@10 before and after, and whether it moved.

Each ``benchmarks/results/curriculum_cpu*/`` folder is one ``python -m benchmarks.curriculum_cpu`` command (its
``README.md`` names it); this reads their ``validation.json`` (every validation user's episode, before and after
stage 2) and ``settings.json``, recomputes the per-user paired NDCG@10 difference with the same bootstrap and seed
as the run, and lists them side by side with the paired difference to ``trm-only`` after stage 2 (as each run
printed it). No model runs: seconds.

    python -m benchmarks.curriculum_runs      # writes benchmarks/results/curriculum_runs.{md,json,png}

A folder without ``validation.json`` (a run stopped before its validation) is listed below the table with the
first line of its ``NOTES.md``. The reading of the runs is ``docs/training.md`` ("The CPU run").
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import numpy as np

from agents.evaluate import interval_text, paired_difference
from benchmarks.common import RESULTS, markdown_table, protocol_text, write_results
from benchmarks.curriculum_cpu import CPU_ARGS, changed_users

PREFIX = "curriculum_cpu"
"""Results folders read: those under ``--results`` whose name starts with this."""
COMMAND = "python -m benchmarks.curriculum_cpu"
HINTED = "target hint"
"""The ``prompt`` of a run whose prompt named the target's categories (``--target-hint``); an agent's is "agent's"."""
OWN_FLAGS = ("--run", "--out", "--export")
"""Flags that name folders only: left out of the table's flags column (the run folder has its own column)."""


def command_of(readme: Path) -> str:
    """The ``curriculum_cpu`` command a run's ``README.md`` names (its first line starting with it), or ""."""
    if not readme.is_file():
        return ""
    return next((ln.strip() for ln in readme.read_text().splitlines() if ln.strip().startswith(COMMAND)), "")


def flags_of(command: str) -> tuple[str, str]:
    """``(flags, run folder)`` of a command: its flags but ``--run``/``--out``/``--export``, and ``--run``'s value."""
    words = shlex.split(command)[len(shlex.split(COMMAND)) :]
    kept, run, i = [], CPU_ARGS.out, 0  # without --run, the default run folder
    while i < len(words):
        if words[i] in OWN_FLAGS:
            run = words[i + 1] if words[i] == "--run" and i + 1 < len(words) else run
            i += 2
            continue
        kept.append(words[i])
        i += 1
    return (" ".join(kept) or "(defaults)"), run


def scripted(val: dict, agent: str) -> tuple[float | str, str, str]:
    """``agent``'s validation NDCG@10 and the run's printed paired differences (LLM before, after stage 2 - ``agent``).

    "-" for what the run did not record.
    """
    for row in val.get("scripted", []):
        if row.get("agent") == agent:
            before, after = (row.get(f"LLM {w} - agent (95% CI)", "-") for w in ("before", "after"))
            return row.get("ndcg@10", "-"), before, after
    return "-", "-", "-"


def summarize_run(folder: Path) -> dict:
    """One table row of a results folder holding ``validation.json`` and ``settings.json``.

    Raises ``ValueError`` naming the folder when the two validations are not of the same users.
    """
    val = json.loads((folder / "validation.json").read_text())
    settings = json.loads((folder / "settings.json").read_text())
    before = {r["example"]: r for r in val["before"]}
    after = {r["example"]: r for r in val["after"]}
    if set(before) != set(after) or not before:
        raise ValueError(f"{folder}: the validations before and after are not of the same users")
    seed = settings.get("stage", {}).get("seed", 0)
    mean, lo, hi, n = paired_difference({u: r["ndcg@10"] for u, r in after.items()},
                                        {u: r["ndcg@10"] for u, r in before.items()}, seed)  # fmt: skip
    fails = [np.mean([r["format_fail"] for r in v.values()]) for v in (before, after)]
    command = command_of(folder / "README.md")
    flags, run = flags_of(command) if command else ("(no command in README.md)", "not recorded")
    trm = val.get("trm", "")
    trm_only, trm_only_before, trm_only_after = scripted(val, "trm-only")
    return {
        "results": folder.name,
        "prompt": HINTED if settings.get("target_hint") else "agent's",
        "flags": flags,
        "run folder": run,
        "trm": trm.split()[1] if trm.startswith("weights ") else "not recorded",
        "stage-2 steps": settings.get("steps", {}).get("rec"),
        "users": n,
        "ndcg@10 before": float(np.mean([r["ndcg@10"] for r in before.values()])),
        "ndcg@10 after": float(np.mean([r["ndcg@10"] for r in after.values()])),
        "difference": mean,
        "low": lo,
        "high": hi,
        "after - before (95% CI)": interval_text(mean, lo, hi),
        "moved": "up" if lo > 0 else "down" if hi < 0 else "no",
        "better / worse": "{better} / {worse}".format(**changed_users(val["before"], val["after"])),
        "format failures": f"{fails[0]:.3f} -> {fails[1]:.3f}",
        "trm-only": trm_only,
        "before - trm-only (95% CI)": trm_only_before,
        "after - trm-only (95% CI)": trm_only_after,
    }


def collect(results: Path) -> tuple[list[dict], list[dict]]:
    """Rows of every validated run under ``results``, and ``{results, note}`` of the folders without validation."""
    rows, unvalidated = [], []
    for folder in sorted(p for p in results.glob(PREFIX + "*") if p.is_dir()):
        if (folder / "validation.json").is_file() and (folder / "settings.json").is_file():
            rows.append(summarize_run(folder))
        else:
            notes = folder / "NOTES.md"
            first = notes.read_text().splitlines()[0].lstrip("# ").strip() if notes.is_file() else "no NOTES.md"
            unvalidated.append({"results": folder.name, "note": first})
    return rows, unvalidated


def plot(rows: list[dict], path: Path) -> None:
    """Each run's paired NDCG@10 difference (after - before) with its 95% interval, one line a run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.arange(len(rows))[::-1]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.6))
    for yi, r in zip(y, rows, strict=True):
        color = {"up": "tab:green", "down": "tab:red"}.get(r["moved"], "tab:gray")
        ax.errorbar(r["difference"], yi, xerr=[[r["difference"] - r["low"]], [r["high"] - r["difference"]]],
                    fmt="o", color=color, capsize=3)  # fmt: skip
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, [f"{r['results']} ({r['users']} users)" for r in rows], fontsize=8)
    ax.set_xlabel("validation NDCG@10, after - before stage 2\n(mean per-user difference, 95% bootstrap interval)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


COLUMNS = ["results", "prompt", "users", "stage-2 steps", "trm", "ndcg@10 before", "ndcg@10 after",
           "after - before (95% CI)", "better / worse", "format failures", "trm-only", "before - trm-only (95% CI)",
           "after - trm-only (95% CI)"]  # fmt: skip


def report(rows: list[dict], unvalidated: list[dict]) -> str:
    """The markdown: the table, how many runs moved which way, each run's flags, the protocol."""

    def moved(part: list[dict]) -> str:
        counts = {m: sum(r["moved"] == m for r in part) for m in ("up", "down", "no")}
        return (f"the interval of after - before lies above 0 in {counts['up']}, below 0 in {counts['down']}, and "
                f"holds 0 in {counts['no']}")  # fmt: skip

    honest = [r for r in rows if r["prompt"] != HINTED]
    control = [r for r in rows if r["prompt"] == HINTED]
    lines = [
        "## Stage 2 on a CPU: every committed run",
        "",
        markdown_table(rows, COLUMNS),
        "",
        f"{len(honest)} validated run{'s' * (len(honest) != 1)} of an agent's prompt: {moved(honest)}."
        + (
            f" {len(control)} with the target's categories in the prompt (`--target-hint`: privileged, a positive "
            f"control of the trainer, not an agent): {moved(control)}."
            if control
            else ""
        ),
        "",
        "Flags of each run (`python -m benchmarks.curriculum_cpu` with these, and `--run`/`--out` naming its folders):",
        "",
        *(f"- `{r['results']}` (run folder `{r['run folder']}`): `{r['flags']}`" for r in rows),
    ]
    if unvalidated:
        lines += ["", "Not validated (stopped before the validation):", ""]
        lines += [f"- `{u['results']}`: {u['note']}" for u in unvalidated]
    protocol = {
        "source": f"benchmarks/results/{PREFIX}*/validation.json (every validation episode) and settings.json",
        "model": "SmolLM2-135M-Instruct + LoRA, greedy validation, warm start then stage 2 (each run's README.md)",
        "data": "ml-100k; validation users: the first N of a seeded order of the evaluation group's valid targets",
        "after - before": "mean per-user NDCG@10 difference, 95% bootstrap interval (2000 resamples, the run's seed)",
        "better / worse": "validation users whose NDCG@10 rose / fell",
        "format failures": "share of validation episodes failing the format, before -> after",
        "trm-only": "NDCG@10 of trm-only (one call without a preference, its top 10) on the same validation episodes",
        "before / after - trm-only": "LLM before / after stage 2 - trm-only, paired on the same episodes, as the run "
        "printed it ('-': the run predates it)",
        "trm": "the TRM weights' digest (runs on other digests trained their TRM on another machine; docs/trm.md)",
        "rows with the same run folder": "validate the same checkpoints (on more users)",
        "prompt": "agent's: what any agent reads; target hint: the prompt also named the target's categories "
        "(--target-hint, privileged: a positive control of the trainer; docs/training.md)",
    }
    return "\n".join(lines) + f"\n\nProtocol:\n{protocol_text(protocol)}\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(RESULTS), help="folder holding the curriculum_cpu* results folders")
    ap.add_argument("--out", default=str(RESULTS), help="where curriculum_runs.{md,json,png} go")
    args = ap.parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        ap.error(f"--results {results}: no such folder")
    rows, unvalidated = collect(results)
    if not rows:
        ap.error(f"--results {results}: no {PREFIX}*/ folder holds validation.json and settings.json")
    text = report(rows, unvalidated)
    print(text)
    out = Path(args.out)
    payload = {"benchmark": "curriculum_runs", "runs": rows, "unvalidated": unvalidated}
    js, md = write_results("curriculum_runs", payload, text, out)
    plot(rows, out / "curriculum_runs.png")
    print(f"wrote {js}, {md} and {out / 'curriculum_runs.png'}")


if __name__ == "__main__":
    main()
