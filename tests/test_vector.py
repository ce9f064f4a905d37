import gymnasium as gym
import numpy as np
import pytest

from tests.test_env import CALL, answer_segment, other_titles


@pytest.fixture
def vec(env_kwargs, resources):
    return gym.make_vec("DeepRec-v0", num_envs=3, vectorization_mode="vector_entry_point", **env_kwargs)


def test_vector_matches_single_envs(vec, make_env):
    obs, infos = vec.reset(seed=10)
    singles = [make_env() for _ in range(3)]
    for i, env in enumerate(singles):
        o, _ = env.reset(seed=10 + i)
        assert o == obs[i]
    actions = [CALL.format("drama"), "invalid text", CALL.format("comedy")]
    obs, rewards, terms, truncs, infos = vec.step(actions)
    for i, env in enumerate(singles):
        o, r, te, tr, info = env.step(actions[i])
        assert o == obs[i] and r == rewards[i] and te == terms[i] and tr == truncs[i]
    assert terms.tolist() == [False, True, False]
    assert np.array_equal(infos["retrieved"][0], singles[0].episode.retrieved[0])
    assert infos["_retrieved"].tolist() == [True, False, True]


def test_vector_autoreset_next_step(vec):
    vec.reset(seed=0)
    _, _, terms, _, _ = vec.step(["bad", "bad", "bad"])
    assert terms.all()
    obs, rewards, terms, truncs, infos = vec.step(["ignored"] * 3)
    assert all(o.endswith("<think>\n") for o in obs)  # fresh prompts
    assert not terms.any() and (rewards == 0).all()


def test_vector_full_episode(vec):
    vec.reset(seed=1)
    vec.step([CALL.format("drama")] * 3)
    envs = vec.unwrapped.envs
    answers = [
        answer_segment([e.catalog.titles[e.episode.target]] + other_titles(e, e.episode.target, 9)) for e in envs
    ]
    _, rewards, terms, _, infos = vec.step(answers)
    assert terms.all() and (infos["rank"] == 0).all()
    assert (rewards > 2.9).all()  # hit 1 + rank 2 + point


def test_sync_vector_env(env_kwargs, resources):
    env = gym.make_vec("DeepRec-v0", num_envs=2, vectorization_mode="sync", **env_kwargs)
    obs, _ = env.reset(seed=0)
    assert isinstance(obs, tuple) and len(obs) == 2


def test_bad_vector_args(vec):
    with pytest.raises(ValueError, match="2 actions for 3"):
        vec.step(["a", "b"])
