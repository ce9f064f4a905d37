"""A vectorised DeepRec environment: one batched encode + TRM + faiss call per vector step.

``gym.make_vec("DeepRec-v0", num_envs=8, vectorization_mode="vector_entry_point")`` builds it. All
sub-environments share one :class:`~deeprec_env.env.Resources` (dataset, TRM, index) per process.
Autoreset follows Gymnasium's default ``NEXT_STEP`` mode: the step after an episode ends resets that
sub-environment and ignores its action.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from deeprec_env.env import DeepRecEnv, EnvConfig, RetrievalRequest, get_resources


class DeepRecVectorEnv(VectorEnv):
    """``num_envs`` :class:`~deeprec_env.env.DeepRecEnv` copies stepped together with batched retrieval."""

    metadata = {"render_modes": ["ansi"], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 1, render_mode: str | None = None, **kwargs: Any) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs={num_envs}; must be >= 1")
        resources = kwargs.pop("resources", None) or get_resources(EnvConfig(**kwargs))
        self.envs = [DeepRecEnv(render_mode=render_mode, resources=resources, **kwargs) for _ in range(num_envs)]
        self.num_envs = num_envs
        self.render_mode = render_mode
        self.resources = resources
        self.single_observation_space = self.envs[0].observation_space
        self.single_action_space = self.envs[0].action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._needs_reset = np.zeros(num_envs, dtype=bool)

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        """Reset every sub-environment (``seed`` may be one int, giving seed + i, or a list)."""
        if seed is None or isinstance(seed, int):
            seeds = [None if seed is None else seed + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"{len(seeds)} seeds for {self.num_envs} environments")
        obs, infos = [], {}
        for i, env in enumerate(self.envs):
            o, info = env.reset(seed=seeds[i], options=options)
            obs.append(o)
            infos = self._add_info(infos, info, i)
        self._needs_reset[:] = False
        return tuple(obs), infos

    def step(self, actions):
        """Step every sub-environment; all calls of this step share one retrieval batch."""
        if len(actions) != self.num_envs:
            raise ValueError(f"{len(actions)} actions for {self.num_envs} environments")
        results: list = [None] * self.num_envs
        pending: list[tuple[int, RetrievalRequest]] = []
        for i, (env, action) in enumerate(zip(self.envs, actions, strict=True)):
            if self._needs_reset[i]:
                o, info = env.reset()
                results[i] = (o, 0.0, False, False, info)
                continue
            out = env.begin_step(action)
            if isinstance(out, RetrievalRequest):
                pending.append((i, out))
            else:
                results[i] = out
        if pending:
            reqs = [r for _, r in pending]
            exclude = [r.exclude if r.exclude is not None else np.zeros(0, np.int64) for r in reqs]
            ids, _ = self.resources.retriever.retrieve(
                [r.history for r in reqs],
                [r.preference for r in reqs],
                self.envs[0].config.retrieval_k,
                exclude=exclude if any(len(e) for e in exclude) else None,
            )
            for (i, _), row in zip(pending, ids, strict=True):
                results[i] = self.envs[i].end_step(row)
        obs, rewards, terms, truncs, infos = [], [], [], [], {}
        for i, (o, r, te, tr, info) in enumerate(results):
            obs.append(o)
            rewards.append(r)
            terms.append(te)
            truncs.append(tr)
            infos = self._add_info(infos, info, i)
        terms, truncs = np.array(terms), np.array(truncs)
        self._needs_reset = terms | truncs
        return tuple(obs), np.array(rewards, dtype=np.float64), terms, truncs, infos

    def render(self) -> tuple[str | None, ...] | None:
        """Each sub-environment's transcript (``render_mode="ansi"``)."""
        if self.render_mode != "ansi":
            return None
        return tuple(env.render() for env in self.envs)
