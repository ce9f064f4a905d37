"""Reliability: hostile actions through the embedded-default environment; crashes, hangs, bad rewards.

Each run steps ``--actions`` segments from ``deeprec_env.testing.hostile_actions`` (lone surrogates,
control and right-to-left characters, split and nested tags, 56k-character preferences, a 5 MB string
every 500 actions, mixed with seeded random calls, answers and garbage) through ``DeepRec-v0``, once with
``invalid_action="end"`` and once with ``"feedback"``, resetting after every episode end.

    python -m benchmarks.fuzz                 # 10,000 actions per mode on ml-100k
    python -m benchmarks.fuzz --smoke         # seconds, synthetic data
"""

from __future__ import annotations

import argparse
import functools
import time

import gymnasium as gym
from tqdm.auto import tqdm

import deeprec_env  # noqa: F401
from benchmarks.common import markdown_table, publish, smoke_env_kwargs
from deeprec_env.cli import positive_int
from deeprec_env.testing import fuzz_run

COLUMNS = ["mode", "actions", "episodes", "invalid", "crashes", "hangs", "non-finite rewards",
           "observations outside the space", "slowest step (s)", "seconds"]  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--actions", type=positive_int, default=10_000, help="actions per mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hang-s", type=float, default=10.0, help="a step slower than this counts as a hang")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    kwargs: dict = smoke_env_kwargs(args.encoder) if args.smoke else {"encoder": args.encoder}
    if args.smoke:
        args.actions = min(args.actions, 300)
    rows, raw = [], {}
    for mode in ("end", "feedback"):
        with tqdm(total=args.actions, desc=f"fuzz ({mode})") as bar:
            t = time.perf_counter()
            make = functools.partial(gym.make, "DeepRec-v0", invalid_action=mode, **kwargs)
            stats = fuzz_run(make, args.actions, args.seed, hang_s=args.hang_s, progress=bar.update)
            seconds = time.perf_counter() - t
        raw[mode] = {**stats, "seconds": seconds}
        rows.append({"mode": mode, "actions": stats["actions"], "episodes": stats["episodes"],
                     "invalid": stats["invalid"], "crashes": stats["crashes"], "hangs": stats["hangs"],
                     "non-finite rewards": stats["non_finite"],
                     "observations outside the space": stats["outside_space"],
                     "slowest step (s)": f"{stats['max_step_s']:.2f}", "seconds": f"{seconds:.0f}"})  # fmt: skip
        for err in stats["errors"]:
            print(f"  {mode}: {err}")
    env = gym.make("DeepRec-v0", **kwargs).unwrapped
    protocol = {
        "dataset": f"{env.res.dataset.name}, split test, default env (DeepRec-v0)",
        "actions": "deeprec_env.testing.hostile_actions: surrogates, control/bidi characters, split and nested "
        "tags, 56k-character preferences, a 5 MB string every 500 actions, random calls/answers/garbage",
        "seed": args.seed,
        "order": "the two modes run in one process on the same action stream, so the second finds the "
        "preferences in the text encoder's cache (hence its speed)",
        "hang": f"a step slower than {args.hang_s:g} s",
        "threads": "package defaults (env threads=1, faiss 1)",
    }
    publish(
        "fuzz", "Reliability (fuzzing)", markdown_table(rows, COLUMNS), protocol, {"runs": raw}, args.smoke, args.out
    )


if __name__ == "__main__":
    main()
