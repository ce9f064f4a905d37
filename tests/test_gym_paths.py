"""The standard Gymnasium and stable-baselines3 paths: vectorisation modes, pickling, make_vec_env, groups."""

import contextlib
import copy
import pickle
import signal

import gymnasium as gym
import numpy as np
import pytest
import torch

from deeprec_env.env import DeepRecEnv, RenderModeError
from deeprec_env.vector import DeepRecVectorEnv
from tests.test_env import CALL, answer_segment, other_titles


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (SIGALRM in the main thread)."""

    def boom(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def ckpt_kwargs(env_kwargs, resources, tmp_path_factory):
    """The tiny env's kwargs with its TRM as a checkpoint, so worker processes load it instead of training."""
    from deeprec_env.trm import save_trm

    path = tmp_path_factory.mktemp("tiny_trm") / "trm"
    save_trm(resources.retriever.trm, path, resources.dataset)
    return {**env_kwargs, "trm_checkpoint": str(path)}


def script(env: DeepRecEnv, step: int) -> str:
    """A fixed three-step policy: a call, an invalid segment (feedback mode), an answer from the catalogue."""
    if step == 0:
        return CALL.format("drama")
    if step == 1:
        return "no tags here"
    ep = env.episode
    return answer_segment(other_titles(env, ep.target, 9) + [env.catalog.titles[ep.target]])


VEC_MODES = {
    "sync": {"vectorization_mode": "sync"},
    "async-fork": {"vectorization_mode": "async", "vector_kwargs": {"context": "fork"}},
    "async-spawn": {"vectorization_mode": "async", "vector_kwargs": {"context": "spawn"}},
    "async-default": {"vectorization_mode": "async"},
    "vector_entry_point": {"vectorization_mode": "vector_entry_point"},
}


CASES = [(m, "DeepRec-v0") for m in VEC_MODES] + [
    (m, "DeepRecColdStart-v0") for m in ("sync", "async-fork", "vector_entry_point")
]


@pytest.mark.parametrize(("mode", "env_id"), CASES)
def test_vector_modes_match_single_envs(mode, env_id, ckpt_kwargs):
    torch.set_num_threads(2)  # the parent has used a multi-threaded pool before forking: must not hang
    torch.ones(256, 256) @ torch.ones(256, 256)
    kwargs = {**ckpt_kwargs, "invalid_action": "feedback"}
    with deadline(240):
        vec = gym.make_vec(env_id, num_envs=2, **VEC_MODES[mode], **kwargs)
        singles = [gym.make(env_id, **kwargs) for _ in range(2)]
        try:
            obs, _ = vec.reset(seed=5)
            for i, env in enumerate(singles):
                o, _ = env.reset(seed=5 + i)
                assert obs[i] == o
            for step in range(3):
                actions = [script(env.unwrapped, step) for env in singles]
                obs, rewards, terms, truncs, _ = vec.step(actions)
                for i, env in enumerate(singles):
                    o, r, te, tr, _ = env.step(actions[i])
                    assert (obs[i], rewards[i], terms[i], truncs[i]) == (o, r, te, tr), (mode, step, i)
            assert terms.all()
        finally:
            vec.close()
    assert torch.get_num_threads() == 2  # the env restores the process's setting


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_numeric_view_async(context, ckpt_kwargs):
    with deadline(240):
        vec = gym.make_vec(
            "DeepRecNumeric-v0", num_envs=2, vectorization_mode="async", vector_kwargs={"context": context},
            n_facets=4, **ckpt_kwargs,
        )  # fmt: skip
        single = gym.make("DeepRecNumeric-v0", n_facets=4, **ckpt_kwargs)
        try:
            obs, _ = vec.reset(seed=1)
            o, _ = single.reset(seed=1)
            np.testing.assert_array_equal(obs[0], o)
            for action in (0, 2, 4):
                obs, rewards, terms, _, _ = vec.step(np.array([action, action]))
                o, r, te, _, _ = single.step(action)
                np.testing.assert_array_equal(obs[0], o)
                assert rewards[0] == r and terms[0] == te
        finally:
            vec.close()


def test_observation_bound_is_tight_and_checked(ckpt_kwargs):
    env = gym.make("DeepRec-v0", **ckpt_kwargs)
    bound = env.observation_space.max_length
    assert bound < 20_000  # shared memory holds this many characters per sub-environment
    obs, _ = env.reset(seed=0)
    assert len(obs) <= bound and env.observation_space.contains(obs)
    with pytest.raises(ValueError, match="max_obs_chars=10 is below"):
        gym.make("DeepRec-v0", max_obs_chars=10, **ckpt_kwargs)


def test_pickle_and_deepcopy_mid_episode(ckpt_kwargs):
    env = gym.make("DeepRec-v0", invalid_action="feedback", **ckpt_kwargs)
    env.reset(seed=3)
    env.step(script(env.unwrapped, 0))
    blob = pickle.dumps(env)
    assert len(blob) < 2_000_000  # the resources are not in it
    clones = [pickle.loads(blob), copy.deepcopy(env)]
    assert clones[1].unwrapped.res is env.unwrapped.res  # re-resolved, shared
    for step in (1, 2):
        out = env.step(script(env.unwrapped, step))
        for clone in clones:
            got = clone.step(script(clone.unwrapped, step))
            assert got[:4] == out[:4]
            assert got[4]["episode_reward_components"] == out[4]["episode_reward_components"]
    # the random stream is carried too: the next random user is the same
    assert pickle.loads(blob).reset()[0] == pickle.loads(blob).reset()[0]


def test_pickle_refuses_hand_made_resources(make_env):
    env = make_env()
    import copy as _copy

    env.res = _copy.copy(env.res)  # e.g. a retriever swapped for a remote one
    with pytest.raises(pickle.PicklingError, match="resources passed in by hand"):
        pickle.dumps(env)


def test_render_mode_error_names_the_fix(ckpt_kwargs):
    with pytest.raises(RenderModeError, match="pass None or 'ansi'") as err:
        DeepRecEnv(render_mode="rgb_array", **ckpt_kwargs)
    assert isinstance(err.value, TypeError) and isinstance(err.value, ValueError)


@pytest.mark.parametrize("vec_env", ["dummy", "subproc"])
def test_sb3_make_vec_env_and_ppo(vec_env, ckpt_kwargs):
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    cls = DummyVecEnv if vec_env == "dummy" else SubprocVecEnv
    with deadline(300):
        vec = make_vec_env(
            "DeepRecNumeric-v0", n_envs=2, seed=0, vec_env_cls=cls, env_kwargs={"n_facets": 4, **ckpt_kwargs}
        )
        try:
            model = PPO("MlpPolicy", vec, n_steps=128, batch_size=64, n_epochs=1, seed=0, device="cpu")
            model.learn(256)
            assert model.num_timesteps >= 256
        finally:
            vec.close()


def test_grouped_vector_rollout_equals_single_episodes(make_env, resources, env_kwargs):
    users = [int(u) for u in make_env().split.users[:4]]
    group = [u for u in users for _ in range(4)]  # 4 users x 4 samples
    vec = DeepRecVectorEnv(num_envs=16, autoreset_mode="disabled", resources=resources, **env_kwargs)
    obs, infos = vec.reset(seed=0, options={"user": group})
    assert infos["user"].tolist() == group
    steps = [
        [CALL.format(["drama", "comedy", "light", "old"][i % 4]) if i % 3 else "broken" for i in range(16)],
        [CALL.format("romance")] * 16,
    ]
    trace = [[] for _ in range(16)]
    for actions in steps:
        live = [a if not ended else None for a, ended in zip(actions, vec._ended, strict=True)]
        obs, rewards, terms, _, infos = vec.step(live)
        for i in range(16):
            if live[i] is not None:
                trace[i].append((obs[i], rewards[i], terms[i]))
    with pytest.raises(ValueError, match="pass None as its"):
        vec.step(["anything"] * 16)  # ended sub-environments (the "broken" ones) take None only
    for i, u in enumerate(group):
        env = make_env()
        env.reset(options={"user": u})
        for actions, expected in zip(steps, trace[i], strict=False):
            o, r, te, _, _ = env.step(actions[i])
            assert (o, r, te) == expected
    vec.reset(options={"reset_mask": np.array([i % 3 == 0 for i in range(16)]), "user": group})
    assert not vec._ended[::3].any()


def test_episode_reward_components_add_up_to_the_return(make_env):
    weights = {"format": 1.0, "hit": 1.0, "rank": 1.0, "point": 0.1, "retrieval_hit": 0.5, "invocation": 0.3}
    for kwargs in ({"invalid_action": "feedback", "reward_weights": weights}, {"stage": "coldstart"}, {}):
        env = make_env(**kwargs)
        env.reset(seed=2)
        total = 0.0
        for step in range(3):
            _, r, term, _, info = env.step(script(env, step))
            total += r
            if term:
                break
        parts = info["episode_reward_components"]
        assert sum(env.weights[c] * v for c, v in parts.items()) == pytest.approx(total)


@pytest.mark.parametrize("bad", [1.5, True, "1", None, float("nan"), -1, 5, np.float32(2.0)])
def test_numeric_view_rejects_non_integer_actions(bad, ckpt_kwargs):
    env = gym.make("DeepRecNumeric-v0", n_facets=4, **ckpt_kwargs).unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match="must be an int"):
        env.step(bad)
    env.step(np.int64(1))  # numpy ints are fine
    env.step(np.array(4))
