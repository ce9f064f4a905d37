"""A numeric view of DeepRec for classic RL (``DeepRecNumeric-v0``): Box observations, Discrete actions.

The environment card is the docstring of :class:`DeepRecNumericEnv`.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from deeprec_env.env import DeepRecEnv
from deeprec_env.protocol import answer_text, call_text
from deeprec_env.threads import limit_threads


class DeepRecNumericEnv(gym.Env[np.ndarray, np.int64]):
    """DeepRecNumeric-v0: discrete facet queries over the text environment, for stable-baselines3 and friends.

    ## Description

    Each action is written as a protocol segment and stepped through the text
    :class:`~deeprec_env.env.DeepRecEnv`, so rewards, metrics, episode ends and ``info`` are the text
    environment's (see its card).

    ## Action Space

    ``Discrete(n_facets + 1)``: action ``a < n_facets`` calls the TRM with one catalogue facet (a
    category, most frequent first) as the preference; action ``n_facets`` finishes: the items retrieved so
    far, ranked by the TRM's no-preference score, become the 10-line answer. An action is a Python or numpy
    integer (or a 0-d integer array); anything else (``1.5``, ``True``, ``"1"``, out of range) raises
    ``ValueError``.

    ## Observation Space

    ``Box(0, 1, (2 * n_facets + 3,), float32)``: the share of each facet in the user's history
    (``n_facets``), which facets were already queried (``n_facets``), calls used / budget, distinct items
    retrieved / (budget * k), and the share of the best retrieved items' facets that match the history's
    top facet.

    ## Rewards, Starting State, Episode End

    The text environment's: finishing before any call fails the format check (-1), and so does a call
    past the budget; every end is a termination.

    ## Version History

    - v0 (deeprec-env 0.2): the text environment's 0.2 changes apply.
    - v0 (deeprec-env 0.1): first release.

    ## Example

    >>> import gymnasium as gym, deeprec_env
    >>> from deeprec_env.trm import TRMConfig
    >>> tiny = TRMConfig(d_model=16, n_heads=2, ffn_dim=32, max_len=12, max_epochs=1)
    >>> env = gym.make("DeepRecNumeric-v0", dataset="synthetic", trm=tiny, n_facets=4)
    >>> obs, info = env.reset(seed=0)
    >>> obs.shape, env.action_space
    ((11,), Discrete(5))
    >>> obs, reward, terminated, truncated, info = env.step(0)  # query the most frequent facet
    >>> obs, reward, terminated, truncated, info = env.step(4)  # finish
    >>> terminated, info["format_errors"]
    (True, [])

    Args:
        n_facets: facets offered as actions (the most frequent categories of the catalogue).
        render_mode: ``"ansi"`` renders the underlying text transcript.
        text_env: view this existing text environment instead of building one (an agent evaluated in
            the text harness uses this).
        **kwargs: forwarded to :class:`~deeprec_env.env.DeepRecEnv` (dataset, stage, ...).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(
        self, n_facets: int = 16, render_mode: str | None = None, text_env: DeepRecEnv | None = None, **kwargs: Any
    ) -> None:
        self.text_env = text_env if text_env is not None else DeepRecEnv(render_mode=render_mode, **kwargs)
        self.render_mode = render_mode
        cats = self.text_env.catalog.all_categories
        if n_facets < 1:
            raise ValueError(f"n_facets={n_facets}; must be >= 1")
        self.facets = tuple(cats[:n_facets])
        self.n_facets = len(self.facets)
        if self.n_facets == 0:
            raise ValueError("the catalogue has no categories to use as facets")
        self._facet_matrix = self.text_env.catalog.category_matrix[:, : self.n_facets].astype(np.float32)
        self.action_space = spaces.Discrete(self.n_facets + 1)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(2 * self.n_facets + 3,), dtype=np.float32)
        self._k = self.text_env.config.answer_k
        self._calls = self.text_env.config.max_calls
        self._queried = np.zeros(self.n_facets, np.float32)
        self._history_of = None

    def observe(self) -> np.ndarray:
        """The numeric observation of the text environment's current episode."""
        return self._obs()

    def _history_facets(self, ep) -> tuple[np.ndarray, int]:
        """The history's facet shares and top facet, computed once per episode."""
        if self._history_of is not ep:
            hist = self._facet_matrix[ep.history].sum(0) if len(ep.history) else np.zeros(self.n_facets, np.float32)
            hist = hist / max(1.0, float(hist.sum()))
            self._history_of, self._history = ep, (hist, int(np.argmax(hist)) if hist.any() else 0)
        return self._history

    def _obs(self) -> np.ndarray:
        env = self.text_env
        ep = env.episode
        hist, top = self._history_facets(ep)
        retrieved = np.unique(np.concatenate(ep.retrieved)) if ep.retrieved else np.zeros(0, np.int64)
        match = float(self._facet_matrix[retrieved[: self._k], top].mean()) if len(retrieved) else 0.0
        budget = self._calls * env.config.retrieval_k
        extra = [min(1.0, ep.n_calls / self._calls), min(1.0, len(retrieved) / budget), match]
        return np.concatenate([hist, self._queried, np.asarray(extra, np.float32)]).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Reset the text environment and return the numeric observation."""
        super().reset(seed=seed)
        _, info = self.text_env.reset(seed=seed, options=options)
        self._queried = np.zeros(self.n_facets, np.float32)
        return self._obs(), info

    def _answer(self) -> str:
        env = self.text_env
        ep = env.episode
        with limit_threads(env.config.threads):
            pool = env.res.retriever.rank(env.trm_history, dict.fromkeys(int(i) for ids in ep.retrieved for i in ids))
        titles = [env.catalog.titles[i] for i in pool[: self._k]]
        return answer_text(titles, env.config.protocol, "Ranking the retrieved items by the recommender's score.")

    def action_text(self, action) -> str:
        """The protocol segment for ``action``: a facet call, or the final answer."""
        if isinstance(action, np.ndarray) and action.ndim == 0:
            action = action[()]
        if (
            isinstance(action, bool | np.bool_)
            or not isinstance(action, int | np.integer)
            or not 0 <= int(action) <= self.n_facets
        ):
            raise ValueError(
                f"action={action!r} ({type(action).__name__}); must be an int (Python or numpy) in 0..{self.n_facets}"
            )
        a = int(action)
        if a == self.n_facets:
            return self._answer()
        self._queried[a] = 1.0
        facet = self.facets[a]
        return call_text(facet, self.text_env.config.protocol, f"Exploring the {facet} facet.")

    def step(self, action):
        """Query facet ``action`` or finish (``action == n_facets``)."""
        _, reward, terminated, truncated, info = self.text_env.step(self.action_text(action))
        return self._obs(), reward, terminated, truncated, info

    def render(self) -> str | None:
        """The underlying text transcript (``render_mode="ansi"``)."""
        return self.text_env.render()
