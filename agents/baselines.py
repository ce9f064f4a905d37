"""Scripted baselines. Each acts through the text protocol, so the same env code scores every agent.

All of them call the TRM at least once (the format check requires a call) and end with a
well-formed 10-line answer, so their scores measure the ranking, not the formatting.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from agents.base import Policy
from deeprec_env.protocol import answer_text, call_text, history_block, read_items

REASONING = "Based on the retrieved items and the history, here is my ranking."


def _answer(env, titles: list[str]) -> str:
    return answer_text(titles[: env.config.answer_k], env.config.protocol, REASONING)


def _call(env, preference: str, why: str) -> str:
    return call_text(preference, env.config.protocol, why)


class _TwoStep(Policy):
    """Call once with :meth:`preference`, then answer with :meth:`ranking` of what came back."""

    def preference(self, state) -> str:
        """The preference of the single call."""
        return "movies the user would enjoy next"

    def ranking(self, state, retrieved: list[str]) -> list[str]:
        """Titles to answer, best first (default: the retrieved list as is)."""
        return retrieved

    def act(self, state, obs: str) -> str:
        """Call first, then answer."""
        env = state["env"]
        if env.episode.n_calls == 0:
            return _call(env, self.preference(state), "I will ask the recommender.")
        retrieved = [t for t, _ in read_items(obs)]
        return _answer(env, self.ranking(state, retrieved))


class RandomPolicy(_TwoStep):
    """Answers 10 items drawn uniformly from the catalogue (after one call, for the format)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def ranking(self, state, retrieved):
        """Ten distinct random catalogue titles."""
        cat = state["env"].catalog
        picks = self.rng.choice(np.arange(1, cat.num_embeddings), size=state["env"].config.answer_k, replace=False)
        return [cat.titles[int(i)] for i in picks]


class PopularityPolicy(_TwoStep):
    """Answers the 10 most popular items of the training data."""

    name = "popularity"

    def ranking(self, state, retrieved):
        """The most popular training items (ties by item id)."""
        env = state["env"]
        pop = env.res.dataset.item_popularity.astype(np.float64)
        pop[0] = -1
        top = np.lexsort((np.arange(len(pop)), -pop))[: env.config.answer_k]
        return [env.catalog.titles[int(i)] for i in top]


class TRMOnlyPolicy(_TwoStep):
    """One call with an empty preference; answers the TRM's top 10 in order.

    Needs ``allow_empty_preference=True`` in the env (the evaluation harness sets it).
    """

    name = "trm-only"

    def preference(self, state) -> str:
        """No preference."""
        return ""


class OraclePolicy(_TwoStep):
    """Privileged upper bound: the preference is the target's categories; answers the top 10."""

    name = "oracle-preference"
    privileged = True

    def preference(self, state) -> str:
        """The target's categories."""
        env = state["env"]
        return "; ".join(env.catalog.categories[env.episode.target]) or "movies"


class HistoryFacetPolicy(Policy):
    """Calls the TRM once per frequent history category, then merges the lists by TRM score.

    The categories come from the prompt text; the merge scores each retrieved item with the TRM's
    no-preference user vector for this user.

    Args:
        n_calls: calls per episode; a sequence draws one of its values per episode (uniformly, from a
            generator seeded by ``seed``), e.g. ``(1, 2, 3)`` for varied demonstrations.
        seed: seed of that draw.
    """

    name = "history-facet"

    def __init__(self, n_calls: int | tuple[int, ...] = 3, seed: int = 0) -> None:
        choices = (n_calls,) if isinstance(n_calls, int) else tuple(n_calls)
        if not choices or min(choices) < 1:
            raise ValueError(f"n_calls={n_calls}; must be >= 1 (or a non-empty sequence of such)")
        self.n_calls = n_calls
        self._choices = choices
        self._rng = np.random.default_rng(seed)

    def start(self, env, obs, info):
        """Read the history's categories from the prompt and pick the facets to query."""
        n = self._choices[0] if len(self._choices) == 1 else int(self._rng.choice(self._choices))
        counts = Counter(c for _, cats in read_items(history_block(obs)) for c in cats)
        facets = [c for c, _ in counts.most_common(n)] or ["movies the user would enjoy next"]
        return {"env": env, "facets": facets, "pool": []}

    def act(self, state, obs: str) -> str:
        """Query the next facet, or merge everything retrieved by TRM score and answer."""
        env = state["env"]
        if env.episode.n_calls:
            state["pool"].extend(t for t, _ in read_items(obs))
        if env.episode.n_calls < len(state["facets"]):
            facet = state["facets"][env.episode.n_calls]
            return _call(env, facet, f"The history shows many {facet} items.")
        ids = dict.fromkeys(i for i in (env.catalog.ground(t) for t in state["pool"]) if i is not None)
        return _answer(env, [env.catalog.titles[i] for i in env.res.retriever.rank(env.trm_history, ids)])


BASELINES = {
    "random": RandomPolicy,
    "popularity": PopularityPolicy,
    "trm-only": TRMOnlyPolicy,
    "history-facet": HistoryFacetPolicy,
    "oracle-preference": OraclePolicy,
}
"""Scripted baselines by name."""
