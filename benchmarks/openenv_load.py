"""Load check of the OpenEnv server on loopback: concurrent sessions of a scripted agent, checked episode by episode.

The server runs in its own process (``deeprec serve``); ``--sessions`` WebSocket clients each play
``--episodes`` episodes at once (one call with the history's top category, then the call's top 10 as
the answer). Every episode is replayed with the same actions in an in-process environment: its rewards
must be equal. Reported: errors, mismatches, step latency p50/p99 over the network next to the
in-process step time, and episodes per second.

    python -m benchmarks.openenv_load              # ml-100k, 16 sessions x 50 episodes
    python -m benchmarks.openenv_load --smoke      # seconds
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import environment, markdown_table, protocol_text, smoke_env_kwargs, write_results
from deeprec_env.cli import positive_int
from deeprec_env.env import DeepRecEnv
from deeprec_env.preferences import top_history_categories
from deeprec_env.protocol import answer_text, call_text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(kwargs: dict, port: int, max_sessions: int) -> subprocess.Popen:
    """``deeprec serve`` in a child process, waited for until ``/health`` answers."""
    import requests

    args = [sys.executable, "-m", "deeprec_env.cli", "serve", "--port", str(port), "--max-sessions", str(max_sessions)]
    for key, value in kwargs.items():
        if key == "trm":  # a TRMConfig: the smoke run's tiny TRM is the server's default for synthetic data
            continue
        args += ["--" + key.replace("_", "-"), str(value)]
    log = tempfile.NamedTemporaryFile("w+", prefix="deeprec-serve-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log.name  # read when the server fails
    for _ in range(1200):
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except requests.ConnectionError:
            pass
        if proc.poll() is not None:
            tail = open(proc.log_path).read()[-2000:]  # noqa: SIM115
            raise RuntimeError(f"the server exited with code {proc.returncode}:\n{tail}")
        time.sleep(0.25)
    proc.terminate()
    raise RuntimeError("the server did not answer /health within 5 minutes")


def agent_actions(env: DeepRecEnv, retrieved: list[int] | None) -> str:
    """The scripted agent: a call with the history's top category, then the call's top 10."""
    p = env.config.protocol
    if retrieved is None:
        top = top_history_categories(env.catalog, env.episode.history) or "popular"
        return call_text(top, p, "The history leans one way.")
    return answer_text([env.catalog.titles[int(i)] for i in retrieved[:10]], p, "Ranking the retrieved items.")


async def session(url: str, users: list[int], local: DeepRecEnv, latencies: list[float]) -> list[dict]:
    """Play one episode per user over one WebSocket session; record each episode's actions and rewards."""
    from deeprec_env.openenv_server import DeepRecAction, DeepRecClient

    out = []
    async with DeepRecClient(base_url=url) as client:
        for user in users:
            await client.reset(user=int(user))
            local.reset(options={"user": int(user)})  # the agent reads the same episode locally
            actions, rewards, retrieved, done = [], [], None, False
            while not done:
                action = agent_actions(local, retrieved)
                t = time.perf_counter()
                result = await client.step(DeepRecAction(text=action))
                latencies.append(time.perf_counter() - t)
                local.step(action)  # keeps the local episode in step (its rewards are checked afterwards)
                actions.append(action)
                rewards.append(result.reward)
                retrieved = result.observation.info.get("retrieved")
                done = result.done
            out.append({"user": int(user), "actions": actions, "rewards": rewards})
    return out


def in_process(kwargs: dict, episodes: list[dict]) -> tuple[int, list[float]]:
    """Replay every episode in one in-process env: mismatching episodes and per-step times."""
    env = DeepRecEnv(**kwargs)
    mismatches, times = 0, []
    for ep in episodes:
        env.reset(options={"user": ep["user"]})
        rewards = []
        for action in ep["actions"]:
            t = time.perf_counter()
            rewards.append(env.step(action)[1])
            times.append(time.perf_counter() - t)
        mismatches += rewards != ep["rewards"]
    return mismatches, times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=positive_int, default=16)
    ap.add_argument("--episodes", type=positive_int, default=50, help="episodes per session")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    kwargs: dict = {"split": "test"}
    if args.smoke:
        kwargs = {**smoke_env_kwargs(), **kwargs}
        kwargs.pop("trm")
        args.sessions, args.episodes = 4, 5
    local = [DeepRecEnv(**kwargs) for _ in range(args.sessions)]  # also builds the shared cache for the server
    users = [int(u) for u in local[0].split.users]
    port = _free_port()
    proc = start_server(kwargs, port, args.sessions)
    latencies: list[float] = []
    try:
        jobs = [
            [users[(s * args.episodes + e) % len(users)] for e in range(args.episodes)] for s in range(args.sessions)
        ]

        async def everything():
            url = f"http://127.0.0.1:{port}"
            return await asyncio.gather(
                *(session(url, job, env, latencies) for job, env in zip(jobs, local, strict=True)),
                return_exceptions=True,
            )

        t0 = time.perf_counter()
        results = asyncio.run(everything())
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    errors = [r for r in results if isinstance(r, BaseException)]
    episodes = [ep for r in results if not isinstance(r, BaseException) for ep in r]
    mismatches, local_times = in_process(kwargs, episodes)
    lat, loc = 1e3 * np.array(latencies), 1e3 * np.array(local_times)

    def p50_p99(x: np.ndarray) -> str:
        return f"{np.median(x):.2f} / {np.percentile(x, 99):.2f}"

    rows = [
        {"measure": "sessions x episodes", "value": f"{args.sessions} x {args.episodes}"},
        {"measure": "episodes played / errors", "value": f"{len(episodes)} / {len(errors)}"},
        {"measure": "episodes whose rewards differ from the in-process env's", "value": str(mismatches)},
        {"measure": "step latency over WebSocket, p50 / p99 (ms)", "value": p50_p99(lat)},
        {"measure": "the same steps in process, p50 / p99 (ms)", "value": p50_p99(loc)},
        {"measure": "episodes/s, all sessions", "value": f"{len(episodes) / wall:.1f}"},
    ]  # fmt: skip
    protocol = {
        "dataset": f"{local[0].res.dataset.name}, split test, users in dataset order, {len(users)} of them",
        "server": "deeprec serve in its own process (openenv-core's FastAPI app, uvicorn), loopback",
        "client": f"openenv-core EnvClient over WebSocket, {args.sessions} sessions at once (asyncio), one process",
        "agent": "one call with the history's most frequent category, then the call's top 10 as the answer",
        "check": "every episode replayed in process with the same actions; rewards compared exactly",
        "latency": "client-side time of a step message (network + server), in-process: env.step",
        "load": "the server, the clients and the replay share the machine's cores",
        "errors": [str(e) for e in errors][:5],
    }
    table = markdown_table(rows, ["measure", "value"])
    text = f"## OpenEnv server load check\n\n{table}\n\nProtocol:\n{protocol_text(protocol)}\n"
    print(text)
    payload = {"benchmark": "openenv_load", "protocol": protocol, **environment(), "rows": rows,
               "latency_ms": lat.tolist(), "in_process_ms": loc.tolist()}  # fmt: skip
    if not args.smoke or args.out:
        write_results("openenv_load" + ("_smoke" if args.smoke else ""), payload, text, args.out)
    if errors or mismatches:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
