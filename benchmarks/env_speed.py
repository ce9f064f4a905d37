"""Environment speed: the env's own work per step, and env steps/s single vs vectorised.

1. Own work: one episode with a ~16k-token transcript (8 calls with long reasoning, then a 10-line
   answer); each step is timed without the retrieval call (``begin_step`` + ``end_step``, and the final
   step with format checks, grounding and rewards).
2. Throughput: a scripted two-segment agent (one call, then answer the call's top 10) on the test users,
   with one environment and with a vector environment of ``--num-envs`` (one retrieval batch per step).

    python -m benchmarks.env_speed             # embedded ml-100k (trains/loads the cached TRM)
    python -m benchmarks.env_speed --smoke     # seconds
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np

import deeprec_env  # noqa: F401
from benchmarks.common import environment, markdown_table, protocol_text, write_results
from deeprec_env.env import DeepRecEnv, RetrievalRequest

REASONING = (
    "The user has watched many dramas and a few comedies recently; the last items suggest a shift towards "
    "lighter films from the nineties, so I should look for well-reviewed comedies and romantic stories. "
)


def own_work(env: DeepRecEnv, target_tokens: int, repeats: int) -> dict:
    """Median and max per-step env time (ms) excluding retrieval, for a transcript of ~target_tokens."""
    calls = env.config.max_calls
    chars_per_segment = 4 * target_tokens // (calls + 1)  # ~4 characters per token
    reasoning = (REASONING * (chars_per_segment // len(REASONING) + 1))[:chars_per_segment]
    p = env.config.protocol
    step_ms, final_ms, chars = [], [], 0
    for rep in range(repeats):
        env.reset(options={"example": rep})
        cached = []
        for c in range(calls):
            seg = f"{reasoning} {p.call_open} comedy; romance {c} {p.call_close}"
            t = time.perf_counter()
            req = env.begin_step(seg)
            t_parse = time.perf_counter() - t
            assert isinstance(req, RetrievalRequest)
            ids, _ = env.res.retriever.retrieve([req.history], [req.preference], env.config.retrieval_k)
            cached.append(ids[0])
            t = time.perf_counter()
            env.end_step(ids[0])
            step_ms.append(1e3 * (t_parse + time.perf_counter() - t))
        titles = [env.catalog.titles[int(i)] for i in cached[0][:10]]
        lines = "\n".join(f"{n}. {t}" for n, t in enumerate(titles, start=1))
        answer = f"{reasoning}\n{p.think_close}\n{p.answer_open}\n{lines}\n{p.answer_close}"
        t = time.perf_counter()
        _, _, term, _, info = env.step(answer)
        final_ms.append(1e3 * (time.perf_counter() - t))
        assert term and info["format_errors"] == [], info["format_errors"]
        chars = len(env.episode.response)
    return {
        "transcript_chars": chars,
        "approx_tokens": chars // 4,
        "call_step_p50_ms": float(np.median(step_ms)),
        "call_step_max_ms": float(np.max(step_ms)),
        "final_step_p50_ms": float(np.median(final_ms)),
        "final_step_max_ms": float(np.max(final_ms)),
    }


def scripted_steps(env_or_vec, n_envs: int, episodes: int) -> float:
    """Env steps per second for the call-then-answer agent."""
    is_vec = n_envs > 1 or hasattr(env_or_vec, "num_envs")
    p = (env_or_vec.unwrapped.envs[0] if is_vec else env_or_vec.unwrapped).config.protocol

    def answer(ids):
        titles = [catalog.titles[int(i)] for i in ids[:10]]
        lines = "\n".join(f"{n}. {t}" for n, t in enumerate(titles, start=1))
        return f"Ranking.\n{p.think_close}\n{p.answer_open}\n{lines}\n{p.answer_close}"

    call = f"Exploring. {p.call_open} favourite genres {p.call_close}"
    steps, t = 0, time.perf_counter()
    if not is_vec:
        catalog = env_or_vec.unwrapped.catalog
        for e in range(episodes):
            env_or_vec.reset(seed=e)
            _, _, _, _, info = env_or_vec.step(call)
            env_or_vec.step(answer(info["retrieved"]))
            steps += 2
    else:
        catalog = env_or_vec.unwrapped.envs[0].catalog
        env_or_vec.reset(seed=0)
        for _ in range(max(1, episodes // n_envs)):
            _, _, _, _, info = env_or_vec.step([call] * n_envs)
            env_or_vec.step([answer(r) for r in info["retrieved"]])
            env_or_vec.step([""] * n_envs)  # autoreset step (not counted)
            steps += 2 * n_envs
    return steps / (time.perf_counter() - t)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-envs", type=int, default=16)
    ap.add_argument("--episodes", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=16_000, help="transcript length for the own-work test")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    kwargs: dict = {"encoder": args.encoder}
    if args.smoke:
        from deeprec_env.trm import TRMConfig

        kwargs.update(dataset="synthetic", trm=TRMConfig(d_model=16, ffn_dim=32, max_len=12, max_epochs=1))
        args.episodes, args.repeats, args.num_envs = 16, 1, 4
    env = DeepRecEnv(**kwargs)
    work = own_work(env, args.tokens, args.repeats)
    print(work)
    single = scripted_steps(gym.make("DeepRec-v0", **kwargs), 1, args.episodes)
    vec = gym.make_vec("DeepRec-v0", num_envs=args.num_envs, vectorization_mode="vector_entry_point", **kwargs)
    vectorised = scripted_steps(vec, args.num_envs, args.episodes)
    rows = [
        {
            "measure": f"own work per call step, {work['approx_tokens']}-token transcript (p50 / max ms)",
            "value": f"{work['call_step_p50_ms']:.3f} / {work['call_step_max_ms']:.3f}",
        },
        {
            "measure": "own work of the final step: format checks, grounding, rewards, metrics (p50 / max ms)",
            "value": f"{work['final_step_p50_ms']:.3f} / {work['final_step_max_ms']:.3f}",
        },
        {"measure": "env steps/s, one env (scripted call + answer, retrieval included)", "value": f"{single:.0f}"},
        {
            "measure": f"env steps/s, vector env of {args.num_envs} (one retrieval batch per step)",
            "value": f"{vectorised:.0f}",
        },
    ]
    protocol = {
        "dataset": env.res.dataset.name + f" ({env.res.dataset.n_items} items), split test",
        "own work": "step time minus the retrieval call (parse, item-list text, rewards, format checks)",
        "transcript": f"{env.config.max_calls} calls with long reasoning + answer, ~4 characters per token",
        "agent": "one call with a fixed preference, then the call's top 10 as the answer",
        "episodes": args.episodes,
        "text encoder": args.encoder,
    }
    table = markdown_table(rows, ["measure", "value"])
    text = f"## Environment speed\n\n{table}\n\nProtocol:\n{protocol_text(protocol)}\n"
    print(text)
    payload = {
        "benchmark": "env_speed",
        "protocol": protocol,
        **environment(),
        "own_work": work,
        "steps_per_s_single": single,
        "steps_per_s_vector": vectorised,
        "num_envs": args.num_envs,
    }
    if not args.smoke or args.out:
        write_results("env_speed" + ("_smoke" if args.smoke else ""), payload, text, args.out)


if __name__ == "__main__":
    main()
