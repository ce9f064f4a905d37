"""Conformance checks that ship with the package (after PettingZoo's test utilities).

Each function takes a zero-argument environment factory, raises ``AssertionError`` with a message
on failure, and ends in ``_test`` so that pytest does not collect it on import::

    from deeprec_env.testing import api_test, seed_test
    api_test(lambda: gym.make("DeepRec-v0"))
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np

from deeprec_env.protocol import answer_text, call_text
from deeprec_env.rewards import COMPONENTS

EnvFactory = Callable[[], gym.Env]

GARBAGE = (
    "",
    "\x00\x01\x1b[2J",
    "<|begin_of_preference|>",
    "<|end_of_preference|><|begin_of_preference|>",
    "<recommendation_list></recommendation_list>",
    "<|begin_of_item_list|>\n1. fake<|end_of_item_list|>",
    "<think></think></think>",
    "x" * 200_000,
    "<|begin_of_preference|> a <|end_of_preference|>" * 100,
    "🎬 " * 1000,
)


def scripted_actions(env: gym.Env) -> list:
    """A valid episode's actions: two calls then an answer (text envs), or facet queries then finish."""
    base = env.unwrapped
    if isinstance(env.action_space, gym.spaces.Discrete):
        return [0, min(1, env.action_space.n - 2), env.action_space.n - 1]
    p = base.config.protocol
    titles = [base.catalog.titles[i] for i in range(1, min(base.catalog.num_embeddings, base.config.answer_k + 1))]
    return [
        call_text("drama", p, "The history leans one way."),
        call_text("comedy; action", p, "Another aspect."),
        answer_text(titles, p, "Ranking them."),
    ]


def _rollout(env: gym.Env, seed: int) -> list:
    obs, info = env.reset(seed=seed)
    out = [(_plain(obs), _plain(info))]
    for action in scripted_actions(env):
        obs, r, term, trunc, info = env.step(action)
        out.append((_plain(obs), r, term, trunc, _plain(info)))
        if term or trunc:
            break
    return out


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def api_test(make_env: EnvFactory) -> None:
    """Gymnasium's ``check_env`` on the unwrapped env, plus spaces holding the observations."""
    from gymnasium.utils.env_checker import check_env

    env = make_env()
    check_env(env.unwrapped, skip_render_check=True)
    obs, _ = env.reset(seed=0)
    assert obs in env.observation_space, "reset observation is outside observation_space"
    for action in scripted_actions(env):
        obs, _, term, trunc, _ = env.step(action)
        assert obs in env.observation_space, "step observation is outside observation_space"
        if term or trunc:
            break


def seed_test(make_env: EnvFactory, seeds: tuple[int, ...] = (0, 1, 7)) -> None:
    """Two environments reset with the same seed give the same episode: observations, rewards, info."""
    a, b = make_env(), make_env()
    for seed in seeds:
        ra, rb = _rollout(a, seed), _rollout(b, seed)
        assert ra == rb, f"seed {seed}: two environments diverged"


def reward_sum_test(make_env: EnvFactory, seeds: tuple[int, ...] = (0, 1, 2)) -> None:
    """Every step reports every component, and the reward is the weighted sum of the components."""
    env = make_env()
    weights = env.unwrapped.config.weights if hasattr(env.unwrapped, "config") else env.unwrapped.text_env.weights
    for seed in seeds:
        for step in _rollout(env, seed)[1:]:
            _, r, _, _, info = step
            comps = info["reward_components"]
            assert set(comps) == set(COMPONENTS), f"components {sorted(comps)} != {sorted(COMPONENTS)}"
            expected = sum(weights[k] * v for k, v in comps.items())
            assert abs(r - expected) < 1e-9, f"reward {r} != weighted sum {expected}"


def garbage_action_test(make_env: EnvFactory) -> None:
    """Garbage text is flagged invalid or fails the format check, never raises; a non-str raises TypeError."""
    env = make_env()
    if not isinstance(env.action_space, gym.spaces.Text):
        return
    for text in GARBAGE:
        env.reset(seed=0)
        _, r, term, trunc, info = env.step(text)
        penalised = (term or trunc) and info["reward_components"]["format"] == -1.0
        assert info["is_action_valid"] is False or penalised, f"{text[:40]!r} was accepted unpenalised"
        assert np.isfinite(r)
    env.reset(seed=0)
    for bad in (None, 1, b"bytes"):
        try:
            env.step(bad)
        except TypeError:
            continue
        raise AssertionError(f"step({bad!r}) did not raise TypeError")
