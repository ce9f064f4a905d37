"""kill -9 at any moment of a GRPO run, then the same command: the log equals an uninterrupted run's."""

import json
import os
import random
import signal
import time

import numpy as np
import pytest

from tests.test_grpo import _args, varied_advantages  # noqa: F401  (a fixture)

STEPS = 3


def _in_child(fn):
    """Run ``fn`` in a forked child; return its exit status (killed children report -signal)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            fn()
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _run(out, lm, env_kwargs, sabotage=None):
    def job():
        from agents import grpo

        if sabotage is not None:
            sabotage()
        grpo.train(_args(out, lm, steps=STEPS, val_users=1, temperature=1.5), env_kwargs, progress=False)

    return _in_child(job)


def _log(out):
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    for r in rows:
        for measured in ("seconds", "rollout_seconds", "update_seconds", "rss_gib", "peak_rss_gib"):
            r.pop(measured, None)  # the SFT log has no rollout or update split
    return rows


def _die_on_call(name, n, module="agents.grpo"):
    """Sabotage: SIGKILL this process on the n-th call of ``<module>.<name>``."""

    def sabotage():
        import importlib

        mod = importlib.import_module(module)
        original, calls = getattr(mod, name), [0]

        def wrapped(*a, **k):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*a, **k)

        setattr(mod, name, wrapped)

    return sabotage


def _die_between_renames():
    """Sabotage: SIGKILL after the old checkpoint is moved aside, before the new one takes its name (step 2)."""
    real, seen = os.replace, [0]

    def replace(src, dst):
        real(src, dst)
        if str(dst).endswith(".checkpoint.old"):
            seen[0] += 1
            if seen[0] == 2:
                os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace  # this (child) process only


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_lm_path, env_kwargs, resources):
    out = tmp_path_factory.mktemp("uninterrupted")
    import agents.grpo as grpo

    keep = grpo.compute_advantages
    grpo.compute_advantages = lambda r, whiten: np.tile([1.0, -1.0], r.size // 2).reshape(r.shape)
    try:
        assert _run(out, tiny_lm_path, env_kwargs) == 0
    finally:
        grpo.compute_advantages = keep
    return _log(out)


SABOTAGE = {
    "inside validation": _die_on_call("validate", 1),  # the last step validates
    "between checkpoint and log": _die_on_call("write_log", 3),  # call 1 writes the resumed (empty) log
    "between the checkpoint's renames": _die_between_renames,
    "inside the checkpoint write": _die_on_call("save_checkpoint", 2),
}


@pytest.mark.parametrize("where", list(SABOTAGE))
@pytest.mark.usefixtures("varied_advantages")
def test_kill_then_resume_gives_the_uninterrupted_log(where, reference, tmp_path, tiny_lm_path, env_kwargs):
    assert _run(tmp_path, tiny_lm_path, env_kwargs, SABOTAGE[where]) == -signal.SIGKILL
    partial = _log(tmp_path) if (tmp_path / "log.jsonl").exists() else []
    assert [r["step"] for r in partial] == list(range(len(partial)))  # no gaps, no torn line
    assert _run(tmp_path, tiny_lm_path, env_kwargs) == 0
    _assert_same(_log(tmp_path), reference)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.usefixtures("varied_advantages")
def test_kill_at_a_random_moment(seed, reference, tmp_path, tiny_lm_path, env_kwargs):
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: the run, killed by the parent
        from agents import grpo

        grpo.train(_args(tmp_path, tiny_lm_path, steps=STEPS, val_users=1, temperature=1.5), env_kwargs,
                   progress=False)  # fmt: skip
        os._exit(0)
    time.sleep(random.Random(seed).uniform(0.5, 4.0))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert _run(tmp_path, tiny_lm_path, env_kwargs) == 0
    _assert_same(_log(tmp_path), reference)


def _assert_same(got, want):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
            else:
                assert a[k] == b[k], k


def _sft_args(out, lm):
    from agents.sft import SFTArgs

    return SFTArgs(model=str(lm), episodes=4, epochs=3, batch=2, micro_batch=2, lr=1e-2, prompt_history=5,
                   out=str(out))  # fmt: skip


@pytest.mark.parametrize("delay", [1.0, 2.5])
def test_sft_killed_then_rerun_gives_the_uninterrupted_log(delay, tmp_path, tiny_lm_path, env_kwargs, resources):
    from agents.sft import train_sft

    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _in_child(lambda: train_sft(_sft_args(ref, tiny_lm_path), env_kwargs, progress=False)) == 0
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: the run, killed by the parent
        train_sft(_sft_args(run, tiny_lm_path), env_kwargs, progress=False)
        os._exit(0)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert _in_child(lambda: train_sft(_sft_args(run, tiny_lm_path), env_kwargs, progress=False)) == 0
    _assert_same(_log(run), _log(ref))


@pytest.mark.parametrize(
    "sabotage",
    [_die_on_call("write_log", 3, "agents.runs"), _die_on_call("save_checkpoint", 2, "agents.runs")],
    ids=["between checkpoint and log", "inside the checkpoint write"],
)
def test_sft_resumes_at_the_step_in_flight(sabotage, tmp_path, tiny_lm_path, env_kwargs, resources):
    from agents.sft import train_sft

    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _in_child(lambda: train_sft(_sft_args(ref, tiny_lm_path), env_kwargs, progress=False)) == 0

    def killed():
        sabotage()
        train_sft(_sft_args(run, tiny_lm_path), env_kwargs, progress=False)

    assert _in_child(killed) == -signal.SIGKILL
    state_file = run / "checkpoint" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["step"] >= 1 and not state.get("done")  # completed steps survive the kill
    # as if the killed process's steps had been slow: the finished warm start's time counts them
    state["log"] = [{**h, "seconds": 1000.0} for h in state["log"]]
    state_file.write_text(json.dumps(state))
    assert _in_child(lambda: train_sft(_sft_args(run, tiny_lm_path), env_kwargs, progress=False)) == 0
    _assert_same(_log(run), _log(ref))
    assert json.loads(state_file.read_text())["seconds"] >= 1000.0 * state["step"]
