"""Environment speed: the env's own work per step, and env steps/s single vs vectorised.

1. Own work: one episode with a ~16k-token transcript (8 calls with long reasoning, then a 10-line
   answer); each step is timed without the retrieval call (``begin_step`` + ``end_step``, and the final
   step with format checks, grounding and rewards).
2. Throughput: a scripted two-segment agent (one call, then answer the call's top 10) on the test users,
   with one environment and with a vector environment of ``--num-envs`` (one retrieval batch per step),
   and the numeric view (two facet calls, then finish); each idle and with a second process burning one
   core (a busy machine), under the package's thread defaults and, for contrast, with ``threads=None``.
   The retriever's caches are emptied before each measurement (the env encodes its users' history states
   in blocks when a block is first drawn; later calls reuse them).

    python -m benchmarks.env_speed             # embedded ml-100k (trains/loads the cached TRM)
    python -m benchmarks.env_speed --smoke     # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import time

import gymnasium as gym
import numpy as np

import deeprec_env  # noqa: F401
from benchmarks.common import environment, markdown_table, protocol_text, smoke_env_kwargs, write_results
from deeprec_env.cli import positive_int
from deeprec_env.env import DeepRecEnv, RetrievalRequest
from deeprec_env.protocol import answer_text, call_text
from deeprec_env.threads import thread_settings

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
            seg = call_text(f"comedy; romance {c}", p, reasoning)
            t = time.perf_counter()
            req = env.begin_step(seg)
            t_parse = time.perf_counter() - t
            assert isinstance(req, RetrievalRequest)
            ids, _ = env.res.retriever.retrieve([req.history], [req.preference], env.config.retrieval_k)
            cached.append(ids[0])
            t = time.perf_counter()
            env.end_step(ids[0])
            step_ms.append(1e3 * (t_parse + time.perf_counter() - t))
        answer = answer_text([env.catalog.titles[int(i)] for i in cached[0][:10]], p, reasoning)
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
        return answer_text([catalog.titles[int(i)] for i in ids[:10]], p, "Ranking.")

    call = call_text("favourite genres", p, "Exploring.")
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


def numeric_steps(env, episodes: int) -> float:
    """Numeric-view steps per second: two facet calls, then finish (three steps an episode)."""
    env = env.unwrapped
    steps, t = 0, time.perf_counter()
    for e in range(episodes):
        env.reset(seed=e)
        env.step(e % env.n_facets)
        env.step((e + 1) % env.n_facets)
        env.step(env.n_facets)
        steps += 3
    return steps / (time.perf_counter() - t)


def _burn() -> None:  # pragma: no cover - runs in the burner process
    while True:
        pass


@contextlib.contextmanager
def busy_core():
    """A second process burning one core for the duration of the block (a machine shared with other work)."""
    proc = multiprocessing.get_context("spawn").Process(target=_burn, daemon=True)
    proc.start()
    time.sleep(0.5)
    try:
        yield
    finally:
        proc.terminate()
        proc.join()


def http_comparison(env: DeepRecEnv, kwargs: dict, episodes: int) -> dict:
    """The same scripted episodes with the in-process retriever and with the TRM behind HTTP."""
    import copy

    from benchmarks.http_trm import HTTPRetriever, start_server

    proc, port = start_server(kwargs)
    try:
        remote = HTTPRetriever(port, env.res.retriever.max_len)
        res = copy.copy(env.res)
        res.retriever = remote
        http_env = DeepRecEnv(resources=res, **kwargs)
        local_env = DeepRecEnv(resources=env.res, **kwargs)
        env.res.retriever.clear_cache()
        local = scripted_steps(local_env, 1, episodes)
        over_http = scripted_steps(http_env, 1, episodes)  # the server's retriever starts cold too
        sp = env.split
        hist = [sp.history(i, env.res.retriever.max_len) for i in range(min(len(sp), 100))]
        lat = {}
        for name, r in (("inprocess", env.res.retriever), ("http", remote)):
            ts = []
            for i, h in enumerate(hist):
                t = time.perf_counter()
                r.retrieve([h], [f"comedy #{i % 7}"], 20)
                ts.append(time.perf_counter() - t)
            lat[name] = 1e3 * float(np.median(ts))
        remote.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {
        "steps_per_s_inprocess": local,
        "steps_per_s_http": over_http,
        "ratio_steps": local / over_http,
        "call_p50_ms_inprocess": lat["inprocess"],
        "call_p50_ms_http": lat["http"],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-envs", type=positive_int, default=16)
    ap.add_argument("--episodes", type=positive_int, default=1024)
    ap.add_argument("--tokens", type=positive_int, default=16_000, help="transcript length for the own-work test")
    ap.add_argument("--repeats", type=positive_int, default=5)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    kwargs: dict = smoke_env_kwargs(args.encoder) if args.smoke else {"encoder": args.encoder}
    if args.smoke:
        args.episodes, args.repeats, args.num_envs = 16, 1, 4
    threads_at_start = thread_settings()
    env = DeepRecEnv(**kwargs)
    work = own_work(env, args.tokens, args.repeats)
    print(work)
    text_env = gym.make("DeepRec-v0", **kwargs)
    default_threads = gym.make("DeepRec-v0", threads=None, **kwargs)
    numeric = gym.make("DeepRecNumeric-v0", **kwargs)
    vec = gym.make_vec("DeepRec-v0", num_envs=args.num_envs, vectorization_mode="vector_entry_point", **kwargs)
    for warm in (text_env, default_threads):  # first calls load weights and fill the encoder's cache
        scripted_steps(warm, 1, 16)
    numeric_steps(numeric, 16)
    scripted_steps(vec, args.num_envs, 2 * args.num_envs)
    rounds: dict[str, list[dict]] = {"idle": [], "busy": []}
    for load in ("idle", "busy", "idle", "busy"):  # alternated: a shared machine drifts
        with busy_core() if load == "busy" else contextlib.nullcontext():
            runs = {
                "text": lambda: scripted_steps(text_env, 1, args.episodes),
                "text_threads_none": lambda: scripted_steps(default_threads, 1, args.episodes),
                "numeric": lambda: numeric_steps(numeric, args.episodes),
                "vector": lambda: scripted_steps(vec, args.num_envs, args.episodes),
            }
            got = {}
            for name, run in runs.items():
                env.res.retriever.clear_cache()  # every measurement starts on histories it has not encoded
                got[name] = run()
        rounds[load].append(got)
        print(load, got)
    speed = {load: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for load, rs in rounds.items()}
    single, vectorised = speed["idle"]["text"], speed["idle"]["vector"]
    http = http_comparison(env, kwargs, args.episodes)
    print(http)
    torch_default = threads_at_start["torch threads (process)"]

    def pair(key: str) -> str:
        return f"{speed['idle'][key]:.0f} / {speed['busy'][key]:.0f}"

    rows = [
        {
            "measure": f"own work per call step, {work['approx_tokens']}-token transcript (p50 / max ms)",
            "value": f"{work['call_step_p50_ms']:.3f} / {work['call_step_max_ms']:.3f}",
        },
        {
            "measure": "own work of the final step: format checks, grounding, rewards, metrics (p50 / max ms)",
            "value": f"{work['final_step_p50_ms']:.3f} / {work['final_step_max_ms']:.3f}",
        },
        {"measure": "text env steps/s, one env (scripted call + answer), idle / busy", "value": pair("text")},
        {
            "measure": f"the same with threads=None (the process's {torch_default} torch threads), idle / busy",
            "value": pair("text_threads_none"),
        },
        {"measure": "numeric view steps/s (two facet calls + finish), idle / busy", "value": pair("numeric")},
        {
            "measure": f"text env steps/s, vector env of {args.num_envs} (one retrieval batch per step), idle / busy",
            "value": pair("vector"),
        },
        {
            "measure": "same episodes, one env, TRM served over HTTP on loopback (reference architecture): steps/s",
            "value": f"{http['steps_per_s_http']:.0f} (in-process in this run: {http['steps_per_s_inprocess']:.0f})",
        },
        {"measure": "speed ratio in-process / HTTP (env steps/s)", "value": f"{http['ratio_steps']:.2f}x"},
        {
            "measure": "one retrieval call at batch 1, in-process vs HTTP (p50 ms)",
            "value": f"{http['call_p50_ms_inprocess']:.2f} vs {http['call_p50_ms_http']:.2f}",
        },
    ]
    protocol = {
        "dataset": env.res.dataset.name + f" ({env.res.dataset.n_items} items), split test",
        "own work": "step time minus the retrieval call (parse, item-list text, rewards, format checks)",
        "transcript": f"{env.config.max_calls} calls with long reasoning + answer, ~4 characters per token",
        "agent": "text: one call with a fixed preference, then the call's top 10 as the answer; numeric: "
        "two facet calls, then finish",
        "load": "idle: nothing else of ours running (the machine is shared, so other users' work may run); "
        "busy: a second process of ours spins on one core for the whole measurement; idle, busy, idle, busy "
        "in turn, each figure the mean of its two rounds",
        "threads": f"package defaults: env threads=1 (torch, set around each retrieval), index.threads=1 "
        f"(faiss); process at start: {threads_at_start}",
        "episodes": f"{args.episodes} per measurement",
        "caches": "the retriever's caches (history states, adapted preferences) are emptied before each "
        f"measurement; an env encodes the TRM states of its users in blocks of {DeepRecEnv.PREFETCH} when one "
        "of a block is first drawn, so each figure includes encoding every drawn block once (the HTTP "
        "retriever has no prefetch: it encodes each history at its first call, as the reference does)",
        "text encoder": args.encoder,
        "HTTP": "the same retriever in a separate process (http.server, JSON over one keep-alive loopback "
        "connection, TCP_NODELAY), as the reference's retrieval server; the latency probe cycles through 7 "
        "preferences, so both sides serve them from their encoder cache and the gap is the transport",
    }
    table = markdown_table(rows, ["measure", "value"])
    text = f"## Environment speed\n\n{table}\n\nProtocol:\n{protocol_text(protocol)}\n"
    print(text)
    payload = {
        "http": http,
        "benchmark": "env_speed",
        "protocol": protocol,
        **environment(),
        "own_work": work,
        "steps_per_s_single": single,
        "steps_per_s_vector": vectorised,
        "steps_per_s": speed,
        "steps_per_s_rounds": rounds,
        "threads": threads_at_start,
        "num_envs": args.num_envs,
    }
    if not args.smoke or args.out:
        write_results("env_speed" + ("_smoke" if args.smoke else ""), payload, text, args.out)


if __name__ == "__main__":
    main()
