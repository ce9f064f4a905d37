"""A vectorised DeepRec environment: one batched encode + TRM + faiss call per vector step.

``gym.make_vec("DeepRec-v0", num_envs=8, vectorization_mode="vector_entry_point")`` builds it. All
sub-environments share one :class:`~deeprec_env.resources.Resources` (dataset, TRM, index) per process.

- Autoreset: Gymnasium's default ``NEXT_STEP`` (the step after an episode ends resets that
  sub-environment and ignores its action), or ``autoreset_mode="disabled"``: an ended sub-environment stays
  ended until ``reset(options={"reset_mask": mask})``; its action must be None and it returns
  ``("", 0.0, True, False)`` with no info. A group rollout (G samples of U users) uses this.
- Reset options per sub-environment: ``options={"user": [u1, u1, u2, u2]}`` (a list per key, one entry
  per sub-environment), a list of dicts, or one dict for all; ``"reset_mask"`` resets only some.

:func:`step_together` is the batched step on its own, for any list of environments (the agents' episode
loop uses it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from deeprec_env.env import DeepRecEnv, EnvConfig, RetrievalRequest, get_resources
from deeprec_env.threads import limit_threads

StepResult = tuple[str, float, bool, bool, dict]


def step_together(envs: Sequence[DeepRecEnv], actions: Sequence[str]) -> list[StepResult]:
    """Step each environment with its action; the calls among them share one retrieval batch.

    Calls are batched per retriever (environments on the same resources share one), so the result equals
    stepping each environment on its own, in one encode + TRM + faiss call.
    """
    if len(actions) != len(envs):
        raise ValueError(f"{len(actions)} actions for {len(envs)} environments")
    results: list[StepResult | None] = [None] * len(envs)
    pending: dict[tuple[int, int, int | None], list[tuple[int, RetrievalRequest]]] = {}
    for i, (env, action) in enumerate(zip(envs, actions, strict=True)):
        if not hasattr(env, "begin_step"):  # a wrapped environment: step it as it is
            results[i] = env.step(action)
            continue
        out = env.begin_step(action)
        if isinstance(out, RetrievalRequest):
            key = (id(env.res.retriever), env.config.retrieval_k, env.config.threads)
            pending.setdefault(key, []).append((i, out))
        else:
            results[i] = out
    for group in pending.values():
        first = envs[group[0][0]]
        reqs = [r for _, r in group]
        exclude = [r.exclude if r.exclude is not None else np.zeros(0, np.int64) for r in reqs]
        with limit_threads(first.config.threads):
            ids, _ = first.res.retriever.retrieve(
                [r.history for r in reqs],
                [r.preference for r in reqs],
                first.config.retrieval_k,
                exclude=exclude if any(len(e) for e in exclude) else None,
            )
        for (i, _), row in zip(group, ids, strict=True):
            results[i] = envs[i].end_step(row)
    return results  # type: ignore[return-value]


def _autoreset_mode(mode) -> AutoresetMode:
    allowed = (AutoresetMode.NEXT_STEP, AutoresetMode.DISABLED)
    if isinstance(mode, AutoresetMode):
        if mode in allowed:
            return mode
    elif isinstance(mode, str):
        for m in allowed:
            if mode.replace("_", "").lower() == m.value.lower():
                return m
    raise ValueError(f"autoreset_mode={mode!r}; must be 'next_step' or 'disabled' (or the AutoresetMode member)")


class DeepRecVectorEnv(VectorEnv):
    """``num_envs`` :class:`~deeprec_env.env.DeepRecEnv` copies stepped together with batched retrieval.

    Args:
        num_envs: sub-environments.
        render_mode: None or ``"ansi"``.
        autoreset_mode: ``"next_step"`` (Gymnasium's default) or ``"disabled"`` (see the module docstring).
        **kwargs: fields of :class:`~deeprec_env.env.EnvConfig`, and ``resources``.
    """

    metadata = {"render_modes": ["ansi"], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        render_mode: str | None = None,
        autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
        **kwargs: Any,
    ) -> None:
        if isinstance(num_envs, bool) or not isinstance(num_envs, int | np.integer) or num_envs < 1:
            raise ValueError(f"num_envs={num_envs!r}; must be an int >= 1")
        self.autoreset_mode = _autoreset_mode(autoreset_mode)
        self.metadata = {**self.metadata, "autoreset_mode": self.autoreset_mode}
        resources = kwargs.pop("resources", None) or get_resources(EnvConfig(**kwargs))
        self.envs = [DeepRecEnv(render_mode=render_mode, resources=resources, **kwargs) for _ in range(num_envs)]
        self.num_envs = int(num_envs)
        self.render_mode = render_mode
        self.resources = resources
        self.single_observation_space = self.envs[0].observation_space
        self.single_action_space = self.envs[0].action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._ended = np.zeros(self.num_envs, dtype=bool)
        self._obs = [""] * self.num_envs

    def _per_env_options(self, options) -> list[dict | None]:
        n = self.num_envs
        if options is None:
            return [None] * n
        if isinstance(options, list | tuple):
            if len(options) != n or not all(o is None or isinstance(o, dict) for o in options):
                raise ValueError(f"options as a list needs {n} dicts (one per sub-environment), got {options!r}")
            return list(options)
        if not isinstance(options, dict):
            raise TypeError(f"options must be a dict or a list of {n} dicts, got {type(options).__name__}")
        out: list[dict] = [{} for _ in range(n)]
        for key, value in options.items():
            if isinstance(value, list | tuple | np.ndarray):
                if len(value) != n:
                    raise ValueError(f"options[{key!r}] has {len(value)} entries for {n} sub-environments")
                for i in range(n):
                    out[i][key] = value[i].item() if isinstance(value[i], np.generic) else value[i]
            else:
                for i in range(n):
                    out[i][key] = value
        return out

    def reset(self, *, seed: int | list[int] | None = None, options: dict | list[dict] | None = None):
        """Reset the sub-environments (all, or those in ``options["reset_mask"]``).

        ``seed``: one int (sub-environment i gets seed + i), a list, or None. ``options``: one dict for all,
        a dict of lists (one entry per sub-environment), or a list of dicts; see the module docstring.
        """
        if seed is None or (isinstance(seed, int | np.integer) and not isinstance(seed, bool)):
            seeds = [None if seed is None else int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"{len(seeds)} seeds for {self.num_envs} environments")
        mask = np.ones(self.num_envs, dtype=bool)
        if isinstance(options, dict) and "reset_mask" in options:
            options = dict(options)
            mask = np.asarray(options.pop("reset_mask"))
            if mask.dtype != np.bool_ or mask.shape != (self.num_envs,) or not mask.any():
                raise ValueError(
                    f"options['reset_mask'] must be a bool array of shape ({self.num_envs},) with a True entry"
                )
        per_env = self._per_env_options(options)
        infos: dict = {}
        for i, env in enumerate(self.envs):
            if mask[i]:
                self._obs[i], info = env.reset(seed=seeds[i], options=per_env[i])
                infos = self._add_info(infos, info, i)
        self._ended[mask] = False
        return tuple(self._obs), infos

    def step(self, actions):
        """Step every sub-environment; all calls of this step share one retrieval batch."""
        if len(actions) != self.num_envs:
            raise ValueError(f"{len(actions)} actions for {self.num_envs} environments")
        results: list = [None] * self.num_envs
        live = []
        for i in range(self.num_envs):
            if not self._ended[i]:
                live.append(i)
            elif self.autoreset_mode == AutoresetMode.NEXT_STEP:
                o, info = self.envs[i].reset()
                results[i] = (o, 0.0, False, False, info)
            elif actions[i] is not None:
                raise ValueError(
                    f"sub-environment {i}'s episode has ended (autoreset_mode='disabled'): pass None as its "
                    "action, or reset it with options={'reset_mask': mask}"
                )
            else:
                results[i] = ("", 0.0, True, False, {})
        stepped = step_together([self.envs[i] for i in live], [actions[i] for i in live]) if live else []
        for i, res in zip(live, stepped, strict=True):
            results[i] = res
        obs, rewards, terms, truncs, infos = [], [], [], [], {}
        for i, (o, r, te, tr, info) in enumerate(results):
            obs.append(o)
            rewards.append(r)
            terms.append(te)
            truncs.append(tr)
            if info:
                infos = self._add_info(infos, info, i)
        self._obs = list(obs)
        terms, truncs = np.array(terms, dtype=bool), np.array(truncs, dtype=bool)
        self._ended = terms | truncs
        return tuple(obs), np.array(rewards, dtype=np.float64), terms, truncs, infos

    def render(self) -> tuple[str | None, ...] | None:
        """Each sub-environment's transcript (``render_mode="ansi"``)."""
        if self.render_mode != "ansi":
            return None
        return tuple(env.render() for env in self.envs)
