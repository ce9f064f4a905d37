"""The two-stage curriculum on a CPU: SmolLM2-135M on the embedded ml-100k, warm-started.

    python -m benchmarks.curriculum_cpu             # ~52 min on a 2-core CPU, from an empty cache
    python -m benchmarks.curriculum_cpu --smoke     # tiny synthetic run (seconds; used by the tests)

Runs ``agents.curriculum`` with the settings below (warm start on history-facet transcripts, then
stage ``coldstart``, then stage ``rec`` from its checkpoint), then writes into
``benchmarks/results/curriculum_cpu/``: the combined per-step log (``log.jsonl``), the warm start's
log (``warmstart.jsonl``), ``curves.png`` and ``README.md`` (the command, the protocol, a table of
every step, and first-vs-last comparisons computed from the log). Re-running resumes the run folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from agents.curriculum import run_curriculum
from agents.grpo import GRPOArgs
from agents.sft import SFTArgs
from benchmarks.common import RESULTS, markdown_table, protocol_text

CPU_ARGS = GRPOArgs(users_per_step=2, group_size=4, rollout_batch=8, micro_batch=2, prompt_history=5,
                    retrieval_k=10, lr=2e-5, val_users=2, eval_every=100, out="runs/curriculum-cpu")  # fmt: skip
"""Stage settings of the CPU run (every other field at its GRPOArgs default). Validation (greedy, 2 users) runs
only after the last step of each stage (``eval_every=100``): on 2 cores a greedy pass costs about 35 s per
user, and the run has to fit in an hour from an empty cache; validation does not change the training
numbers (each step reseeds the sampler)."""
CPU_WARM = SFTArgs(teacher_calls=(1, 2), episodes=24, epochs=2, batch=8, micro_batch=2, lr=1e-4)
"""Warm-start settings of the CPU run: the demonstrations make one or two calls, never three, so a rise of
the invocation reward (which pays up to three) is something stage 1 has to find by itself."""
STEPS = {"coldstart": 6, "rec": 1}
"""Optimiser steps per stage. Stage 2 gets one step: on this CPU it shows the stage runs from stage 1's
checkpoint, not that it learns (a 2-step run showed nothing more, and took the command past the hour)."""


def _first_last(rows: list[dict], key: str, n: int = 3) -> dict:
    vals = [r[key] for r in rows if key in r]
    n = min(n, len(vals) // 2)
    if n < 1:
        return {"steps compared": "-", "first": "-", "last": "-"}
    return {"steps compared": f"first {n} vs last {n} of {len(vals)}", "first": f"{np.mean(vals[:n]):.3f}",
            "last": f"{np.mean(vals[-n:]):.3f}"}  # fmt: skip


def cache_contents() -> str:
    """What the cache holds before the run (a fresh machine trains the TRM and converts SmolLM2 first)."""
    from deeprec_env.data import cache_dir

    root = cache_dir()
    parts = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.iterdir())) if root.is_dir() else []
    return ", ".join(parts) if parts else "empty"


def summarize(out: Path, command: str, base: GRPOArgs, warm: SFTArgs, steps: dict, timing: dict | None = None) -> str:
    """README text of a finished run folder; ``timing`` (wall seconds, cache at start) when the run was timed."""
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    state = json.loads((out / "warmstart" / "checkpoint" / "trainer_state.json").read_text())
    cols = ["step", "stage", "reward", "calls", "format_fail", "reward_invocation", "reward_diversity", "reward_hit",
            "loss", "val_ndcg@10", "val_format_fail", "val_calls", "seconds"]  # fmt: skip
    table = markdown_table(rows, cols)
    by_stage = {s: [r for r in rows if r["stage"] == s] for s in ("coldstart", "rec")}
    compare = [
        {"stage": s, "quantity": k, **_first_last(by_stage[s], k)}
        for s, keys in (("coldstart", ("reward", "calls", "format_fail")), ("rec", ("reward", "format_fail")))
        for k in keys
    ]
    val = [r for r in rows if "val_ndcg@10" in r]
    protocol = {
        "model": f"{base.model} (SmolLM2-135M-Instruct, fp32), chat prompt, sampling temperature {base.temperature}",
        "data": f"{base.dataset}, training episodes = the test targets of the RL user group; validation = greedy "
        f"episodes on the first {base.val_users} users of a seeded order of the evaluation group's valid targets",
        "warm start": f"SFT on {state['demonstrations']} {warm.teacher} transcripts (calls drawn from "
        f"{warm.teacher_calls}, mean {state['teacher_calls_mean']:.2f}; {state['mean_tokens']:.0f} tokens each), "
        f"{warm.epochs} epochs, batch {warm.batch}, lr {warm.lr}, {state['seconds']:.0f} s",
        "stage 1": f"coldstart (format + invocation + diversity), {steps['coldstart']} steps, first half of the "
        f"training users whose target is in the TRM's top-{base.difficulty_top}",
        "stage 2": f"rec (format + hit + rank + point), {steps['rec']} steps from stage 1's checkpoint, second half",
        "per step": f"{base.users_per_step} users x {base.group_size} samples, lr {base.lr}, Adam {base.betas}, "
        f"clip ({1 - base.clip_low:.2f}, {1 + base.clip_high:.2f}), whitening '{base.whiten}', KL {base.kl_coef}",
        "episode": f"last {base.prompt_history} history items in the prompt, top-{base.retrieval_k} items per call, "
        f"at most {base.max_new_tokens} new tokens per segment",
        "seed": base.seed,
    }
    if timing:
        protocol["wall clock"] = (f"{timing['seconds'] / 60:.1f} min for this command (warm start, both stages, "
                                  f"summary; cache at start: {timing['cache_at_start']})")  # fmt: skip
    text = (
        "# CPU curriculum run (SmolLM2-135M-Instruct, embedded ml-100k)\n\n"
        f"Command (written by it; 2-core CPU):\n\n```bash\n{command}\n```\n\n"
        f"Protocol:\n{protocol_text(protocol)}\n\n"
        f"## First vs last steps\n\n{markdown_table(compare, list(compare[0]))}\n\n"
        + (
            f"Validation NDCG@10 at steps {[r['step'] for r in val]}: {[round(r['val_ndcg@10'], 4) for r in val]}\n\n"
            if val
            else ""
        )
        + f"## Every step\n\n{table}\n\n![curves](curves.png)\n"
    )
    return text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/curriculum_cpu)")
    ap.add_argument("--run", default=None, help="run folder (default runs/curriculum-cpu)")
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic model and data, seconds")
    ap.add_argument("--model", default=None, help="policy to start from (default: smollm2)")
    ap.add_argument("--encoder", default=None, help="text encoder of the env (default: the embedded MiniLM)")
    args = ap.parse_args(argv)
    base, warm, steps, env_kwargs = CPU_ARGS, CPU_WARM, dict(STEPS), None
    if args.model:
        base = replace(base, model=args.model)
    if args.run:
        base = replace(base, out=args.run)
    if args.smoke:
        from deeprec_env.trm import TRMConfig

        base = replace(base, users_per_step=1, group_size=2, rollout_batch=2, max_new_tokens=8, val_users=2,
                       eval_every=1, dataset="synthetic")  # fmt: skip
        warm = replace(warm, episodes=2, epochs=1, batch=2)
        steps = {"coldstart": 1, "rec": 1}
        env_kwargs = {"trm": TRMConfig(d_model=16, ffn_dim=32, max_len=12, max_epochs=2, batch_size=32)}
    if args.encoder:
        env_kwargs = {**(env_kwargs or {}), "encoder": args.encoder}
    command = "python -m benchmarks.curriculum_cpu" + (" --smoke" if args.smoke else "")
    t0, cache_at_start = time.perf_counter(), cache_contents()
    resumed = (Path(base.out) / "log.jsonl").exists() or (Path(base.out) / "warmstart").exists()
    run_curriculum(base, steps["coldstart"], steps["rec"], env_kwargs, warm_start=warm, progress=not args.smoke)
    run = Path(base.out)
    dest = Path(args.out) if args.out else RESULTS / ("curriculum_cpu" + ("_smoke" if args.smoke else ""))
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "log.jsonl", dest / "log.jsonl")
    shutil.copy(run / "warmstart" / "log.jsonl", dest / "warmstart.jsonl")
    shutil.copy(run / "curves.png", dest / "curves.png")
    # a resumed run's time is not the command's: leave it out rather than print a wrong figure
    timing = None if resumed else {"seconds": time.perf_counter() - t0, "cache_at_start": cache_at_start}
    (dest / "README.md").write_text(summarize(run, command, base, warm, steps, timing))
    (dest / "settings.json").write_text(json.dumps({"stage": asdict(base), "warm_start": asdict(warm),
                                                    "steps": steps, "timing": timing}, indent=2))  # fmt: skip
    print((dest / "README.md").read_text())


if __name__ == "__main__":
    main()
