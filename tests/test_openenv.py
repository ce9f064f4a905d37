"""The OpenEnv server against the real openenv-core client, over loopback."""

import asyncio
import socket
import threading
import time

import pytest

pytest.importorskip("openenv.core")
uvicorn = pytest.importorskip("uvicorn")

from deeprec_env.env import DeepRecEnv  # noqa: E402
from deeprec_env.openenv_server import DeepRecAction, DeepRecClient, create_app  # noqa: E402
from deeprec_env.testing import scripted_actions  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server on a free loopback port, in a thread of this process (the tiny env)."""
    import os

    from deeprec_env.fixtures import build_tiny_encoder, tiny_env_kwargs

    old = os.environ.get("DEEPREC_CACHE")
    os.environ["DEEPREC_CACHE"] = str(tmp_path_factory.mktemp("openenv_cache"))
    kwargs = tiny_env_kwargs(build_tiny_encoder(tmp_path_factory.mktemp("enc")), prompt_history=5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(max_sessions=8, **kwargs), host="127.0.0.1", port=port,
                                        log_level="error", ws_ping_interval=None))  # fmt: skip
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", kwargs
    srv.should_exit = True
    thread.join(timeout=10)
    if old is None:
        os.environ.pop("DEEPREC_CACHE", None)
    else:
        os.environ["DEEPREC_CACHE"] = old


def test_client_episode_equals_the_in_process_env(server):
    url, kwargs = server
    local = DeepRecEnv(**kwargs)
    for user in (0, 3):
        obs, _ = local.reset(options={"user": user})
        expected, final = [(obs, None, False)], None
        for action in scripted_actions(local):
            o, r, term, trunc, final = local.step(action)
            expected.append((o, r, term or trunc))
        with DeepRecClient(base_url=url).sync() as env:
            got = [env.reset(user=user)]
            got += [env.step(DeepRecAction(text=a)) for a in scripted_actions(local)]
            state = env.state()
        assert [(g.observation.text, g.reward, g.done) for g in got] == expected
        assert got[0].observation.info["user"] == user
        assert got[-1].observation.info["metrics"] == pytest.approx(final["metrics"])
        components = got[-1].observation.info["episode_reward_components"]
        assert components == pytest.approx(final["episode_reward_components"])
        assert state.done and state.user == user and state.step_count == 3
        assert state.episode_return == pytest.approx(sum(r for _, r, _ in expected[1:]))


def test_bad_messages_get_errors_and_the_session_lives_on(server):
    url, _ = server
    with DeepRecClient(base_url=url).sync() as env:
        with pytest.raises(RuntimeError, match="step before reset"):
            env.step(DeepRecAction(text="hello"))
        with pytest.raises(RuntimeError, match="user"):
            env.reset(user=10**6)
        with pytest.raises(RuntimeError, match="stage="):
            env.reset(stage="nope")
        with pytest.raises(RuntimeError, match="unknown reset options"):
            env.reset(colour="red")
        r = env.reset(user=1, stage="coldstart")
        assert not r.done and r.observation.text
        r = env.step(DeepRecAction(text="no tags at all"))
        assert r.done and r.reward < 0  # malformed: penalised and flagged, not an error
        with pytest.raises(RuntimeError, match="has ended"):
            env.step(DeepRecAction(text="again"))
        assert not env.reset(user=2).done


def test_http_endpoints_answer_bad_requests_with_4xx(server):
    import requests

    url, _ = server
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    r = requests.post(f"{url}/reset", json={"user": 0}, timeout=10)
    assert r.status_code == 200 and r.json()["observation"]["info"]["user"] == 0
    r = requests.post(f"{url}/step", json={"action": {"text": "x"}}, timeout=10)
    assert r.status_code == 400 and "reset" in r.json()["detail"]
    assert requests.post(f"{url}/step", json={"action": {"text": 3}}, timeout=10).status_code == 422
    assert requests.post(f"{url}/reset", json={"user": "abc"}, timeout=10).status_code == 400
    assert requests.get(f"{url}/health", timeout=10).status_code == 200  # still serving


def test_concurrent_sessions_are_independent(server):
    url, kwargs = server
    local = DeepRecEnv(**kwargs)

    async def one(user):
        async with DeepRecClient(base_url=url) as env:
            await env.reset(user=user)
            rewards = []
            for action in scripted_actions(local):
                rewards.append((await env.step(DeepRecAction(text=action))).reward)
            return rewards

    async def group():
        return await asyncio.gather(*(one(u % 4) for u in range(8)))

    results = asyncio.run(group())
    for u, rewards in enumerate(results):
        local.reset(options={"user": u % 4})
        assert rewards == [local.step(a)[1] for a in scripted_actions(local)]


def test_the_client_example_runs(server):
    import os
    import subprocess
    import sys
    from pathlib import Path

    url, _ = server
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, str(root / "examples" / "openenv_client.py"), "--url", url, "--users", "0", "1"],
        capture_output=True, text=True, timeout=120, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("NDCG@10") == 2
