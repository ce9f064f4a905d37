"""The policy interface and the episode loop shared by every agent.

A policy turns the newest observation of an episode into the next text segment. Per-episode state
lives in an object the policy returns from :meth:`Policy.start`, so one policy can drive many
episodes at once (:meth:`Policy.act_batch`), which is how the LLM policy batches generation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deeprec_env.env import DeepRecEnv
from deeprec_env.vector import step_together


class Policy:
    """Base class: override :meth:`act` (scripted agents) or :meth:`act_batch` (batched agents)."""

    name: str = "policy"
    """Label used in result tables."""
    privileged: bool = False
    """True when the policy reads information an agent would not have (e.g. the target)."""

    def start(self, env: DeepRecEnv, obs: str, info: dict) -> Any:
        """Begin an episode; return its state (default: a dict holding the env, prompt and info)."""
        return {"env": env, "prompt": obs, "info": info}

    def act(self, state: Any, obs: str) -> str:
        """The next segment for one episode, given its newest observation."""
        raise NotImplementedError

    def act_batch(self, states: list[Any], observations: list[str]) -> list[str]:
        """The next segment of several episodes (default: one :meth:`act` each)."""
        return [self.act(s, o) for s, o in zip(states, observations, strict=True)]

    def tokens(self, state: Any) -> int:
        """Tokens the policy generated in this episode (0 for scripted agents)."""
        return 0

    def describe(self, state: Any) -> dict:
        """Extra per-episode data for the record (the LLM policy returns its generated segments)."""
        return {}


@dataclass
class EpisodeRecord:
    """What one episode produced: the per-episode line of an evaluation's JSON lines file."""

    agent: str
    user: int
    user_id: str
    target: int
    answer_ids: list
    rank: int
    metrics: dict
    reward: float
    reward_components: dict
    calls: int
    tokens: int
    seconds: float
    hallucinated: int
    seen: int
    duplicates: int
    format_errors: list
    invalid_segments: int = 0
    extra: dict = field(default_factory=dict)
    episode_reward_components: dict = field(default_factory=dict)
    """Each reward component summed over the episode (unweighted; ``reward_components`` is the last step's):
    their sum weighted by the env's weights is ``reward``."""
    retrieved_rank: int = -1
    """The target's best position (0-based) in any call's retrieved list, -1 if no call retrieved it: with
    ``rank``, it tells a miss of retrieval (the calls) from one of ordering (the answer)."""
    from_retrieved: int = 0
    """Answer lines naming an item that one of the episode's calls retrieved."""
    preferences: list = field(default_factory=list)
    """The preference of each call, as the environment read it."""
    shown: int = 0
    """Answer lines naming an item of the history the prompt shows (``seen`` counts the user's whole history): what
    an agent can know it should not recommend again."""


def run_episodes(
    policy: Policy, envs: list[DeepRecEnv], options: list[dict], *, max_steps: int = 64
) -> list[EpisodeRecord]:
    """Run one episode per (env, options) pair in lock step, so a batched policy generates for all at once."""
    return play_episodes(policy, envs, options, max_steps=max_steps)[0]


def play_episodes(
    policy: Policy, envs: list[DeepRecEnv], options: list[dict], *, max_steps: int = 64
) -> tuple[list[EpisodeRecord], list[Any]]:
    """:func:`run_episodes` that also returns each episode's policy state (e.g. its token trajectory).

    ``envs`` is a list of environments or a :class:`~deeprec_env.vector.DeepRecVectorEnv` (its
    sub-environments are used); each step's calls share one retrieval batch
    (:func:`~deeprec_env.vector.step_together`).
    """
    envs = list(getattr(envs, "envs", envs))
    if len(envs) != len(options):
        raise ValueError(f"{len(envs)} envs for {len(options)} option dicts")
    t0 = time.perf_counter()
    states, obs, infos = [], [], []
    for env, opt in zip(envs, options, strict=True):
        o, info = env.reset(options=opt)
        states.append(policy.start(env, o, info))
        obs.append(o)
        infos.append(info)
    totals = [0.0] * len(envs)
    finals: list[dict | None] = [None] * len(envs)
    invalid = [0] * len(envs)
    active = list(range(len(envs)))
    for _ in range(max_steps):
        if not active:
            break
        actions = policy.act_batch([states[i] for i in active], [obs[i] for i in active])
        still = []
        results = step_together([envs[i] for i in active], actions)  # one retrieval batch for all calls
        for i, (o, r, term, trunc, info) in zip(active, results, strict=True):
            totals[i] += r
            invalid[i] += not info["is_action_valid"]
            obs[i] = o
            if term or trunc:
                finals[i] = info
            else:
                still.append(i)
        active = still
    for i in active:  # a policy that never ends its episodes: end them with an invalid segment
        o, r, term, trunc, info = envs[i].step("")
        totals[i] += r
        finals[i] = info
    seconds = (time.perf_counter() - t0) / max(1, len(envs))
    records = []
    for i, env in enumerate(envs):
        f = finals[i]
        records.append(
            EpisodeRecord(
                agent=policy.name,
                user=infos[i]["user"],
                user_id=infos[i]["user_id"],
                target=f["target"],
                answer_ids=f["answer_ids"],
                rank=f["rank"],
                metrics=f["metrics"],
                reward=totals[i],
                reward_components=f["reward_components"],
                calls=env.episode.n_calls,
                tokens=policy.tokens(states[i]),
                seconds=seconds,
                hallucinated=f["hallucinated"],
                seen=f["seen"],
                duplicates=f["duplicates"],
                format_errors=f["format_errors"],
                invalid_segments=invalid[i],
                extra=policy.describe(states[i]),
                episode_reward_components=dict(f["episode_reward_components"]),
                preferences=list(env.episode.preferences),
                **episode_diagnostics(env.episode),
            )
        )
    return records, states


def episode_diagnostics(episode) -> dict:
    """``retrieved_rank``, ``from_retrieved`` and ``shown`` of a finished episode (see :class:`EpisodeRecord`)."""
    positions = [np.flatnonzero(ids == episode.target) for ids in episode.retrieved]  # each call's (an array)
    retrieved = {int(i) for ids in episode.retrieved for i in ids}
    shown = set(episode.history.tolist())
    return {"retrieved_rank": min((int(p[0]) for p in positions if len(p)), default=-1),
            "from_retrieved": sum(i is not None and i in retrieved for i in episode.answer_ids),
            "shown": sum(i is not None and i in shown for i in episode.answer_ids)}  # fmt: skip
