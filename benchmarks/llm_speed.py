"""LLM policy speed: the same episodes generated one at a time and as one batch.

python -m benchmarks.llm_speed                 # SmolLM2-135M on CPU, 8 ml-100k test users, ~2 min
python -m benchmarks.llm_speed --model Qwen/Qwen2.5-0.5B-Instruct --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import time

from agents.base import run_episodes
from agents.evaluate import episode_options
from agents.llm import LLMPolicy
from benchmarks.common import environment, markdown_table, protocol_text, write_results
from deeprec_env.cli import device_option, positive_int
from deeprec_env.config import DTYPES
from deeprec_env.env import DeepRecEnv
from deeprec_env.threads import thread_settings


def measure(policy: LLMPolicy, env_kwargs: dict, episodes: int, seed: int = 0) -> list[dict]:
    """Seconds per episode and generated tokens/s in three modes.

    One at a time, and as one batch with and without the KV cache across segments (``agents.kv``); every
    mode plays the same episodes with the same seed.
    """
    envs = [DeepRecEnv(**env_kwargs) for _ in range(episodes)]
    options = episode_options(len(envs[0].split), episodes, seed)
    rows, segments = [], {}
    modes = (
        ("one at a time, KV cache across segments", 1, True),
        (f"batch of {episodes}, whole context each segment (model.generate)", episodes, False),
        (f"batch of {episodes}, KV cache across segments", episodes, True),
    )
    for mode, batch, kv in modes:
        policy.kv_cache = kv
        policy.generator.manual_seed(seed)
        t = time.perf_counter()
        records = []
        for s in range(0, episodes, batch):
            records += run_episodes(policy, envs[s : s + batch], options[s : s + batch])
        wall = time.perf_counter() - t
        tokens = sum(r.tokens for r in records)
        segments[mode] = [r.extra["segments"] for r in records]
        rows.append({"mode": mode, "episodes": len(records), "s/episode": wall / len(records),
                     "generated tokens/s": tokens / wall, "tokens/episode": tokens / len(records),
                     "segments/episode": sum(len(x) for x in segments[mode]) / len(records)})  # fmt: skip
        print(rows[-1], flush=True)
    a, b = segments[modes[1][0]], segments[modes[2][0]]
    rows[2]["same segments as model.generate"] = "yes" if a == b else "no"
    rows[2]["speed-up"] = f"{rows[1]['s/episode'] / rows[2]['s/episode']:.2f}x"
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", type=device_option, default="cpu")
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    ap.add_argument("--episodes", type=positive_int, default=8)
    ap.add_argument("--max-new-tokens", type=positive_int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    policy = LLMPolicy(args.model, device=args.device, dtype=args.dtype, max_new_tokens=args.max_new_tokens)
    # feedback mode: a segment that neither calls nor answers gets a message and the episode goes on, so
    # even a zero-shot model plays multi-turn episodes (up to 4 segments)
    rows = measure(policy, {"prompt": "chat", "invalid_action": "feedback"}, args.episodes, args.seed)
    protocol = {
        "model": f"{args.model}, greedy, max {args.max_new_tokens} new tokens per segment",
        "device": f"{args.device}, {args.dtype}",
        "episodes": f"{args.episodes} ml-100k test users (seeded order {args.seed}), chat prompt, "
        "invalid_action='feedback' (an invalid segment gets a message and the episode goes on, so even a "
        "zero-shot model plays several segments)",
        "load": f"1-minute load average {os.getloadavg()[0]:.2f} at start on {os.cpu_count()} cores (a shared "
        "machine: other work may run)",
        "note": "wall time includes prompt processing, generation and the environment",
        "threads": f"LLM: torch {thread_settings()['torch threads (process)']} (the process's); env: 1 (its default)",
    }
    columns = list(dict.fromkeys(k for r in rows for k in r))
    text = f"## LLM policy speed\n\n{markdown_table(rows, columns, fmt='{:.2f}')}\n\nProtocol:\n"
    text += protocol_text(protocol) + "\n"
    print(text)
    write_results("llm_speed", {"benchmark": "llm_speed", "protocol": protocol, **environment(), "rows": rows},
                  text, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
