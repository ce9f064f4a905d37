"""Scripted baselines. Each acts through the text protocol, so the same env code scores every agent.

All of them call the TRM at least once (the format check requires a call) and end with a
well-formed 10-line answer, so their scores measure the ranking, not the formatting.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from agents.base import Policy
from deeprec_env.preferences import title_year
from deeprec_env.protocol import answer_text, call_text, history_block, read_hint, read_items

REASONING = "Based on the retrieved items and the history, here is my ranking."


def _answer(env, titles: list[str]) -> str:
    return answer_text(titles[: env.config.answer_k], env.config.protocol, REASONING)


def _call(env, preference: str, why: str) -> str:
    return call_text(preference, env.config.protocol, why)


def unseen_first(titles: list[str], seen: set[str], k: int) -> list[str]:
    """The first ``k`` of ``titles`` not in ``seen``, topped up with seen ones if fewer remain."""
    fresh = [t for t in titles if t not in seen]
    return (fresh + [t for t in titles if t in seen])[:k]


def seen_titles(prompt: str) -> set[str]:
    """Titles of the history shown in the prompt: what an agent knows the user has already consumed."""
    return {t for t, _ in read_items(history_block(prompt))}


def top_categories(history: list[tuple[str, tuple[str, ...]]], n: int = 1) -> list[str]:
    """The ``n`` most frequent categories of a history read from a prompt (``read_items``)."""
    return [c for c, _ in Counter(c for _, cats in history for c in cats).most_common(n)]


class _TwoStep(Policy):
    """Call once with :meth:`preference`, then answer with :meth:`ranking` of what came back."""

    def preference(self, state) -> str:
        """The preference of the single call."""
        return "movies the user would enjoy next"

    skip_seen = False
    """Answer the best retrieved items that are not in the prompt's history, instead of the top 10 as is."""

    def skips_seen(self, state) -> bool:
        """Whether this episode's answer skips the prompt's history titles (``skip_seen``; a subclass may draw it)."""
        return self.skip_seen

    def ranking(self, state, retrieved: list[str]) -> list[str]:
        """Titles to answer, best first: the retrieved list, without the history's titles when :meth:`skips_seen`."""
        seen = seen_titles(state["prompt"]) if self.skips_seen(state) else set()
        return unseen_first(retrieved, seen, state["env"].config.answer_k)

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


class TRMOnlyUnseenPolicy(TRMOnlyPolicy):
    """:class:`TRMOnlyPolicy` that skips titles already in the prompt's history (what any agent can see)."""

    name = "trm-only-unseen"
    skip_seen = True


class TopCategoryPolicy(_TwoStep):
    """One call with the history's most frequent category (read from the prompt); answers the top 10.

    The simplest honest test of the preference channel: the same single call as ``trm-only``, plus a word.
    """

    name = "history-top-category"

    def preference(self, state) -> str:
        """The most frequent category of the prompt's history."""
        top = top_categories(read_items(history_block(state["prompt"])))
        return top[0] if top else "movies the user would enjoy next"


class TopCategoryUnseenPolicy(TopCategoryPolicy):
    """:class:`TopCategoryPolicy` that skips titles already in the prompt's history.

    A word for the TRM and what the prompt shows: the two things an LLM agent can add to the TRM alone (the
    teacher of the bundled CPU run's warm start).
    """

    name = "history-top-category-unseen"
    skip_seen = True


class OraclePolicy(_TwoStep):
    """Privileged upper bound: the preference is the target's categories; answers the top 10."""

    name = "oracle-preference"
    privileged = True

    def preference(self, state) -> str:
        """The target's categories."""
        env = state["env"]
        return "; ".join(env.catalog.categories[env.episode.target]) or "movies"


class _DrawnShare:
    """A teacher that draws per episode whether it departs from the agent it extends.

    The draw has probability ``share``, from a generator seeded by ``seed``.
    """

    def __init__(self, share: float = 0.25, seed: int = 0) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share={share}; must be in [0, 1]")
        self.share = share
        self._rng = np.random.default_rng(seed)

    def _draw(self) -> bool:
        return bool(self._rng.random() < self.share)


class HintMixPolicy(_DrawnShare, TopCategoryUnseenPolicy):
    """Teacher of the positive control (``EnvConfig.target_hint``): a share of its calls copy the prompt's hint.

    In a drawn share of its episodes it calls with the categories the prompt's hint names instead of the history's
    top category; it answers as :class:`TopCategoryUnseenPolicy`.

    It reads only its prompt, but a prompt with a hint gives the target's categories away: a warm start on its
    transcripts makes a policy whose samples sometimes copy the hint and mostly do not, so a trainer has a better
    call to find in its own samples (``docs/training.md``). Not in :data:`BASELINES`: without the env's hint it is
    an error, and with it no score of it is an agent's.

    Args:
        share: probability that an episode's call copies the hint.
        seed: seed of the per-episode draw.
    """

    name = "hint-mix"

    def start(self, env, obs, info):
        """Check the prompt has a hint and draw whether this episode copies it."""
        hint = read_hint(obs)
        if hint is None:
            raise ValueError("the hint-mix teacher needs the env's target_hint=True (its prompt has no hint line)")
        return {**super().start(env, obs, info), "hint": hint, "copy": self._draw()}

    def preference(self, state) -> str:
        """The hint's categories (as ``oracle-preference`` writes the target's) or the history's top category."""
        if state["copy"] and state["hint"]:
            return "; ".join(state["hint"])
        return super().preference(state)


class UnseenMixPolicy(_DrawnShare, TopCategoryPolicy):
    """A warm-start teacher whose answers skip the prompt's history titles in a drawn share of its episodes.

    It calls as ``history-top-category``; in a share of its episodes it answers as
    ``history-top-category-unseen`` (the retrieved titles the prompt's history does not show), in the others the
    retrieved list as it came. It reads only its prompt: an honest agent, weaker than the unseen teacher. A warm
    start on its transcripts makes a policy whose samples sometimes skip the shown titles and sometimes list them,
    so stage 2 has a better answer to find in its own samples on the agent's prompt (``docs/training.md``). Not in
    :data:`BASELINES`: as an agent it is a blend of two that are.

    Args:
        share: probability that an episode's answer skips the prompt's history titles.
        seed: seed of the per-episode draw.
    """

    name = "unseen-mix"

    def start(self, env, obs, info):
        """Draw whether this episode's answer skips the shown titles."""
        return {**super().start(env, obs, info), "skip": self._draw()}

    def skips_seen(self, state) -> bool:
        """Whether this episode was drawn to skip the shown titles."""
        return state["skip"]


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
        facets = top_categories(read_items(history_block(obs)), n) or ["movies the user would enjoy next"]
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


class HistoryDescriberPolicy(Policy):
    """An honest multi-call agent: describes the user's history in words and fuses what the TRM returns.

    It reads only what any agent reads (the prompt's history and the item lists) and calls the TRM once
    with no preference and once per description of the history: its most frequent category, "like
    <its last title>" and its most frequent decade (when titles carry a year). The lists are merged by
    reciprocal-rank fusion (each list gives an item ``1 / (k0 + rank)``), titles the user has already
    consumed (the prompt's history) are skipped, and the best 10 are answered.

    Args:
        k0: the fusion's rank offset (larger: flatter votes).
    """

    name = "history-describer"

    def __init__(self, k0: float = 60.0) -> None:
        self.k0 = k0

    def start(self, env, obs, info):
        """Write the preferences from the history in the prompt."""
        hist = read_items(history_block(obs))
        prefs = ["", *top_categories(hist)]
        if hist:
            prefs.append(f"like {hist[-1][0]}")
        decades = Counter(y // 10 * 10 for t, _ in hist if (y := title_year(t)))
        if decades:
            prefs.append(f"from the {decades.most_common(1)[0][0]}s")
        return {"env": env, "prefs": prefs, "lists": [], "seen": {t for t, _ in hist}}

    def act(self, state, obs: str) -> str:
        """The next description, or the fused answer."""
        env = state["env"]
        n = env.episode.n_calls
        if n:
            state["lists"].append([t for t, _ in read_items(obs)])
        if n < len(state["prefs"]):
            why = "Let me ask the recommender." if not state["prefs"][n] else "Another view of the history."
            return _call(env, state["prefs"][n], why)
        votes: dict[str, float] = {}
        for lst in state["lists"]:
            for r, t in enumerate(lst):
                votes[t] = votes.get(t, 0.0) + 1.0 / (self.k0 + r)
        ranked = sorted(votes, key=lambda t: -votes[t])  # stable: ties keep first-seen order
        return _answer(env, unseen_first(ranked, state["seen"], env.config.answer_k))


BASELINES = {
    "random": RandomPolicy,
    "popularity": PopularityPolicy,
    "trm-only": TRMOnlyPolicy,
    "trm-only-unseen": TRMOnlyUnseenPolicy,
    "history-top-category": TopCategoryPolicy,
    "history-top-category-unseen": TopCategoryUnseenPolicy,
    "history-facet": HistoryFacetPolicy,
    "history-describer": HistoryDescriberPolicy,
    "oracle-preference": OraclePolicy,
}
"""Scripted baselines by name."""
