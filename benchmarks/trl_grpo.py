"""TRL on DeepRec on this CPU: runs ``examples/trl_grpo.py`` and writes its log as a table.

``python -m benchmarks.trl_grpo`` runs the example (about half an hour on 2 cores);
``python -m benchmarks.trl_grpo --from-run runs/trl_grpo`` formats a finished run's ``log.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import environment, markdown_table, protocol_text, write_results

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "PYTHONPATH=. python examples/trl_grpo.py --out <run folder>"


def table(log: list[dict]) -> tuple[list[dict], list[dict]]:
    """The SFT rows (step, loss, token accuracy) and the GRPO rows (step, reward and its components)."""
    sft, grpo = [], []
    for row in log:
        if "reward" in row:
            grpo.append(
                {
                    "step": row["step"],
                    "reward": float(row["reward"]),
                    "reward_std": float(row["reward_std"]),
                    **{
                        k.split("/")[1].removeprefix("deeprec_"): float(v)
                        for k, v in row.items()
                        if k.startswith("rewards/") and k.endswith("/mean")
                    },
                    "completion tokens": float(row.get("completions/mean_length", 0.0)),
                    "grad_norm": float(row.get("grad_norm", 0.0)),
                }
            )
        elif "loss" in row and "mean_token_accuracy" in row:
            sft.append(
                {"step": row["step"], "loss": float(row["loss"]), "token accuracy": float(row["mean_token_accuracy"])}
            )
    return sft, grpo


def console_logs(path: Path) -> list[dict]:
    """The log dicts a transformers Trainer printed (``{'loss': '0.95', ...}``), numbers as floats."""
    import ast

    rows = []
    for line in path.read_text(errors="replace").replace("\r", "\n").splitlines():
        line = line.strip()
        if line.startswith("{'loss'"):
            row = ast.literal_eval(line)
            rows.append({k: float(v) for k, v in row.items()} | {"step": len(rows) + 1})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-run", default=None, help="a finished run folder (its log.json); default: run the example")
    ap.add_argument("--seconds", type=float, default=None, help="wall time of the --from-run run, if known")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.from_run is None:
        run = Path(tempfile.mkdtemp(prefix="trl_grpo-"))
        t0 = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TRL_EXPERIMENTAL_SILENCE": "1"}
        subprocess.run([sys.executable, "examples/trl_grpo.py", "--out", str(run)], cwd=ROOT, env=env, check=True)
        seconds = time.perf_counter() - t0
    else:
        run, seconds = Path(args.from_run), args.seconds
    data = json.loads((run / "log.json").read_text())
    sft_source = "log.json"
    if "sft_log" not in data and (run / "stdout.log").is_file():  # runs before the example saved it
        data["sft_log"], sft_source = console_logs(run / "stdout.log"), "the run's console output (stdout.log)"
    sft, _ = table(data.get("sft_log", []))
    _, grpo = table(data["log"])
    cols = list(grpo[0]) if grpo else ["step"]
    protocol = {
        "command": COMMAND.replace("<run folder>", str(run))
        + ("" if args.from_run is None else f"; then python -m benchmarks.trl_grpo --from-run {run}"),
        "model": "SmolLM2-135M-Instruct (the embedded GGUF, dequantised to float32), full fine-tune, CPU",
        "episodes": f"{data['env_kwargs']}: the RL user group's test targets (training users, not the evaluation's)",
        "warm start": "TRL SFTTrainer, 1 epoch over 24 history-facet transcripts (demonstration_dataset), batch 4, "
        "lr 1e-4",
        "RL": "TRL GRPOTrainer with DeepRecRollout (192 new tokens per segment, KV cache, temperature 1), "
        "reward_functions; 8 episodes a step (2 prompts x 4 generations), lr 1e-5",
        "reward": "the environment's return; one column per weighted component (their sum is the reward)",
        "wall time": "unknown" if seconds is None else f"{seconds / 60:.1f} min on 2 CPU cores (shared machine)",
        "logs": f"GRPO rows from log.json; SFT rows from {sft_source}",
        "what it shows": "the adapter trains SmolLM2 with TRL end to end on a CPU; 3 steps are not a learning curve",
    }
    sft_table = markdown_table(sft, ["step", "loss", "token accuracy"])
    text = (
        f"## TRL on DeepRec (CPU)\n\nWarm start (SFTTrainer):\n\n{sft_table}\n\nGRPOTrainer:\n\n"
        f"{markdown_table(grpo, cols)}\n\nProtocol:\n{protocol_text(protocol)}\n"
    )
    print(text)
    payload = {"benchmark": "trl_grpo", "protocol": protocol, **environment(), "sft": sft, "grpo": grpo,
               "log": data["log"], "env_kwargs": data["env_kwargs"]}  # fmt: skip
    write_results("trl_grpo", payload, text, args.out)


if __name__ == "__main__":
    main()
