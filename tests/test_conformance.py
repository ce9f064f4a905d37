import gymnasium as gym
import pytest

import deeprec_env
from deeprec_env.testing import api_test, garbage_action_test, reward_sum_test, sampled_actions_test, seed_test


@pytest.fixture(params=deeprec_env.ENV_IDS)
def factory(request, env_kwargs, resources):
    return lambda: gym.make(request.param, **env_kwargs)  # resources: cached per process


def test_api(factory):
    api_test(factory)


def test_seed(factory):
    seed_test(factory)


def test_reward_sum(factory):
    reward_sum_test(factory)


def test_garbage_actions(factory):
    garbage_action_test(factory)


def test_sampled_actions(factory):
    sampled_actions_test(factory)


OPTION_GRID = [
    {"invalid_action": "feedback"},
    {"prompt": "chat", "match": "substring"},
    {"dedup_retrieved": True, "mask_history": True},
    {"stage": "coldstart", "allow_empty_preference": True, "max_calls": 2},
    {"reward_weights": {"format": 1.0, "retrieval_hit": 1.0, "point": 0.5}, "user_group": "eval"},
]


@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: ",".join(o))
def test_conformance_over_options(options, env_kwargs, resources):
    def factory():
        return gym.make("DeepRec-v0", **env_kwargs, **options)

    api_test(factory)
    seed_test(factory, seeds=(0, 3))
    reward_sum_test(factory, seeds=(0,))
    garbage_action_test(factory)
    sampled_actions_test(factory, seeds=(5,))


def test_numeric_view_with_sb3(env_kwargs, resources):
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make("DeepRecNumeric-v0", **env_kwargs)
    sb3_check_env(env.unwrapped)
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=16, n_epochs=1, seed=0, device="cpu")
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(total_timesteps=64)
    assert any((a != b.detach()).any() for a, b in zip(before, model.policy.parameters(), strict=True))


def test_numeric_finish_without_call_fails_format(env_kwargs, resources):
    env = gym.make("DeepRecNumeric-v0", **env_kwargs)
    env.reset(seed=0)
    obs, r, term, _, info = env.step(env.action_space.n - 1)
    assert term and r == -1.0 and "no tool call" in info["format_errors"]
    with pytest.raises(ValueError, match="action=99"):
        env.reset(seed=0)
        env.step(99)
