"""Conformance checks that ship with the package (after PettingZoo's test utilities).

Each function takes a zero-argument environment factory, raises ``AssertionError`` with a message
on failure, and ends in ``_test`` so that pytest does not collect it on import::

    from deeprec_env.testing import api_test, sampled_actions_test, seed_test
    api_test(lambda: gym.make("DeepRec-v0"))
"""

from __future__ import annotations

import json
from collections.abc import Callable

import gymnasium as gym
import numpy as np

from deeprec_env.protocol import answer_text, call_text
from deeprec_env.rewards import COMPONENTS
from deeprec_env.storage import jsonable

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
    if base.config.actions == "tools":  # the tool-call variant: JSON tool calls
        return [
            json.dumps({"name": "recommend", "arguments": {"preference": "drama"}, "content": "One way."}),
            {"name": "recommend", "arguments": {"preference": "comedy; action"}},
            json.dumps({"name": "answer", "arguments": {"items": titles}}),
        ]
    return [
        call_text("drama", p, "The history leans one way."),
        call_text("comedy; action", p, "Another aspect."),
        answer_text(titles, p, "Ranking them."),
    ]


def _rollout(env: gym.Env, seed: int) -> list:
    obs, info = env.reset(seed=seed)
    out = [(jsonable(obs), jsonable(info))]
    for action in scripted_actions(env):
        obs, r, term, trunc, info = env.step(action)
        out.append((jsonable(obs), r, term, trunc, jsonable(info)))
        if term or trunc:
            break
    return out


def api_test(make_env: EnvFactory) -> None:
    """Gymnasium's ``check_env`` on the unwrapped env (a warning from it fails), plus observations in their space."""
    import warnings

    from gymnasium.utils.env_checker import check_env

    env = make_env()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped, skip_render_check=True)
    assert not caught, f"check_env warned: {[str(w.message) for w in caught]}"
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


def random_actions(env: gym.Env, rng: np.random.Generator):
    """An endless stream of seeded actions: calls, answers and garbage (text envs), or any index (numeric)."""
    base = env.unwrapped
    if isinstance(env.action_space, gym.spaces.Discrete):
        while True:
            yield int(rng.integers(0, env.action_space.n))
    p, cat = base.config.protocol, base.catalog
    words = sorted({w for t in cat.titles[1:] for w in t.split()} | set(cat.all_categories))
    while True:
        kind = rng.integers(0, 5)
        if kind <= 1:
            pref = " ".join(words[int(i)] for i in rng.integers(0, len(words), int(rng.integers(1, 5))))
            yield call_text(pref, p, "Thinking.")
        elif kind == 2:
            n = base.config.answer_k if rng.random() < 0.7 else int(rng.integers(0, 2 * base.config.answer_k))
            yield answer_text([cat.titles[int(i)] for i in rng.integers(1, cat.num_embeddings, n)], p, "Ranking.")
        elif kind == 3:
            yield GARBAGE[int(rng.integers(0, len(GARBAGE)))]
        else:
            chars = sorted(env.action_space.character_set)
            yield "".join(chars[int(i)] for i in rng.integers(0, len(chars), int(rng.integers(0, 300))))


HOSTILE_CHARS = (
    "\ud800",  # a lone surrogate (what byte-level decoding of a small LM can produce)
    "\udbc2\udc00\udfff",
    "\x00",
    "\x1b[31m",
    "\u202e",  # right-to-left override
    "\u200b\ufeff",  # zero-width space, byte-order mark
    "\r\n\r",
    "\t\v\f",
    "\U0001f3ac",
    "Ａｍéｌｉｅ",
    "1.",
    "10. ",
)
"""Hostile characters that keep a segment's structure: surrogates, control and bidi characters."""

HOSTILE_PIECES = HOSTILE_CHARS + (
    "<|begin_of_pre",
    "ference|>",
    "<|begin_of_preference|>",
    "<|end_of_preference|>",
    "<recommendation_list>",
    "</recommendation_list>",
    "<think>",
    "</think>",
    "<|begin_of_item_list|>",
    "<|end_of_item_list|>",
)
"""Fragments that stress parsing, encoding and grounding: surrogates, control and bidi characters, split
and nested tags."""


def hostile_actions(env: gym.Env, rng: np.random.Generator, *, huge_every: int = 500):
    """An endless stream of adversarial segments mixed with :func:`random_actions`.

    Well-formed calls and answers carrying :data:`HOSTILE_CHARS`, free mixtures of :data:`HOSTILE_PIECES`
    (split and stray tags), nested tags, ~56k-character preferences, and every ``huge_every`` actions a
    5 MB string.
    """
    base = env.unwrapped
    p, cat = base.config.protocol, base.catalog
    plain = random_actions(env, rng)
    n = 0

    def noise(k: int, pieces: tuple[str, ...] = HOSTILE_PIECES) -> str:
        return "".join(pieces[int(i)] for i in rng.integers(0, len(pieces), k))

    while True:
        n += 1
        kind = int(rng.integers(0, 8))
        if huge_every and n % huge_every == 0:
            yield "x" * 5_000_000 if rng.random() < 0.5 else noise(8) * 300_000
        elif kind == 0:  # a well-formed call whose preference is hostile text
            yield call_text(noise(int(rng.integers(1, 6)), HOSTILE_CHARS) + " drama", p, noise(3, HOSTILE_CHARS))
        elif kind == 1:  # a well-formed answer whose lines carry hostile characters
            lines = [
                noise(2, HOSTILE_CHARS) + cat.titles[int(i)] + noise(1, HOSTILE_CHARS)
                for i in rng.integers(1, cat.num_embeddings, 10)
            ]
            yield answer_text(lines, p, noise(2, HOSTILE_CHARS))
        elif kind == 2:  # nested: a call inside a call, an answer inside a call
            yield f"{p.call_open} a {p.call_open} b {p.call_close} {p.call_close}"
        elif kind == 3:
            yield f"{p.call_open} {answer_text(['x'] * 10, p, 'r')} {p.call_close}"
        elif kind == 4:  # a preference of ~56k characters (the segment stays under the length limit)
            yield call_text("comedy " * 8_000 + noise(4, HOSTILE_CHARS), p)
        elif kind == 5:
            yield noise(int(rng.integers(1, 40)))
        else:
            yield next(plain)


def fuzz_run(
    make_env: EnvFactory, n_actions: int, seed: int = 0, *, hang_s: float = 10.0, huge_every: int = 500, progress=None
) -> dict:
    """Step ``n_actions`` of :func:`hostile_actions` through one environment; count what went wrong.

    Returns counts of ``crashes`` (exceptions from ``step``, with the first few messages), ``hangs`` (steps
    over ``hang_s`` seconds), ``non_finite`` rewards, observations ``outside_space``, plus ``episodes``,
    ``invalid`` actions and the slowest step. After a crash the environment is reset and the run goes on.
    """
    import time

    env = make_env()
    rng = np.random.default_rng(seed)
    actions = hostile_actions(env, rng, huge_every=huge_every)
    env.reset(seed=seed)
    out = {"actions": 0, "crashes": 0, "hangs": 0, "non_finite": 0, "outside_space": 0, "episodes": 0,
           "invalid": 0, "max_step_s": 0.0, "errors": []}  # fmt: skip
    for i in range(n_actions):
        action = next(actions)
        t = time.perf_counter()
        try:
            obs, r, term, trunc, info = env.step(action)
        except Exception as e:  # noqa: BLE001 - counting them is the point
            out["crashes"] += 1
            if len(out["errors"]) < 5:
                out["errors"].append(f"{type(e).__name__}: {e}"[:300])
            env.reset(seed=seed + i + 1)
            continue
        finally:
            dt = time.perf_counter() - t
            out["max_step_s"] = max(out["max_step_s"], dt)
            out["hangs"] += dt > hang_s
            out["actions"] += 1
        out["non_finite"] += not np.isfinite(r)
        out["outside_space"] += obs not in env.observation_space
        out["invalid"] += not info["is_action_valid"]
        if term or trunc:
            out["episodes"] += 1
            env.reset(seed=seed + i + 1)
        if progress is not None:
            progress(1)
    return out


def sampled_actions_test(make_env: EnvFactory, seeds: tuple[int, ...] = (0, 1), steps: int = 24) -> None:
    """Seeded random actions mixed with garbage give equal trajectories in two environments.

    Also: never an exception, every observation inside the space, every reward finite.
    """
    from gymnasium.utils.env_checker import data_equivalence

    a, b = make_env(), make_env()
    for seed in seeds:
        runs = []
        for env in (a, b):
            rng = np.random.default_rng(seed)
            actions = random_actions(env, rng)
            obs, info = env.reset(seed=seed)
            out = [(obs, jsonable(info))]
            for t in range(steps):
                obs, r, term, trunc, info = env.step(next(actions))
                assert obs in env.observation_space, f"seed {seed}, step {t}: observation outside the space"
                assert np.isfinite(r), f"seed {seed}, step {t}: reward {r}"
                out.append((obs, r, term, trunc, jsonable(info)))
                if term or trunc:
                    obs, info = env.reset(seed=seed + 1000 * (t + 1))
                    out.append((obs, jsonable(info)))
            runs.append(out)
        assert data_equivalence(runs[0], runs[1]), f"seed {seed}: two environments diverged on sampled actions"


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
