"""Hierarchical rewards (``docs/design.md``): one pure function per named component.

Process level: ``format``, ``invocation``, ``diversity`` and our optional ``retrieval_hit``.
Outcome level (only when ``format`` is 0): ``hit``, ``rank``, ``point`` and our optional ``wasted``.
A stage is a dict of weights keyed by component name; the environment returns every unweighted
component and ``reward = sum(weights[c] * components[c])``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from deeprec_env.protocol import Episode

COMPONENTS: tuple[str, ...] = (
    "format", "invocation", "diversity", "retrieval_hit", "hit", "rank", "point", "wasted"
)  # fmt: skip
"""Every reward component, in the order the environment reports them."""

STAGES: dict[str, dict[str, float]] = {
    "coldstart": {"format": 1.0, "invocation": 1.0, "diversity": 1.0},
    "rec": {"format": 1.0, "hit": 1.0, "rank": 1.0, "point": 1.0},
}
"""Stage weights of the reference; components not listed have weight 0 (``retrieval_hit`` and ``wasted`` are off)."""


def stage_weights(stage: str | None = None, weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Full weight dict for ``stage``, or for explicit ``weights`` (which win); every component present."""
    if weights is None:
        if stage not in STAGES:
            raise ValueError(f"stage={stage!r}; must be one of {list(STAGES)} (or pass reward_weights)")
        weights = STAGES[stage]
    unknown = set(weights) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown reward components {sorted(unknown)}; known: {list(COMPONENTS)}")
    return {c: float(weights.get(c, 0.0)) for c in COMPONENTS}


def weighted_reward(weights: Mapping[str, float], components: Mapping[str, float]) -> float:
    """``sum(weights[c] * components[c])``; a component ``components`` lacks counts 0.

    >>> weighted_reward({"hit": 1.0, "wasted": 2.0}, {"hit": 1.0, "wasted": -0.3, "point": 5.0})
    0.4
    """
    return float(sum(w * components.get(c, 0.0) for c, w in weights.items()))


def format_reward(ep: Episode) -> float:
    """0 when the whole response passes every format check (``ep.format_errors`` empty), else -1.

    >>> format_reward(Episode(user=0, target=1, history=np.zeros(0), format_errors=["no tool call"]))
    -1.0
    """
    return -1.0 if ep.format_errors else 0.0


def invocation_reward(ep: Episode, *, max_count: int = 3, base: float = 0.5) -> float:
    """With ``n = min(calls, max_count)``: 0 if ``n <= 1``, else ``base * (n - 1)``.

    >>> ep = Episode(user=0, target=1, history=np.zeros(0), preferences=["a", "b", "c", "d"])
    >>> invocation_reward(ep)
    1.0
    """
    n = min(ep.n_calls, max_count)
    return 0.0 if n <= 1 else base * (n - 1)


def diversity_reward(ep: Episode, preference_embeddings: np.ndarray, *, base: float = 0.2) -> float:
    """With >= 2 preferences: ``base * (1 - mean pairwise cosine of their unit embeddings)``, else 0.

    >>> ep = Episode(user=0, target=1, history=np.zeros(0), preferences=["a", "b"])
    >>> diversity_reward(ep, np.array([[1.0, 0.0], [0.0, 1.0]]))
    0.2
    """
    n = ep.n_calls
    if n < 2:
        return 0.0
    e = np.asarray(preference_embeddings, dtype=np.float64)
    if e.shape[0] != n:
        raise ValueError(f"{e.shape[0]} embeddings for {n} preferences")
    sim = e @ e.T
    iu = np.triu_indices(n, 1)
    return float(base * (1.0 - sim[iu].mean()))


def retrieval_hit_reward(ep: Episode, call: int) -> float:
    """Credit ``1 / log2(r + 2)`` when the target first appears in the list of call ``call`` at rank ``r``.

    Only the first call that retrieves the target earns it, so the episode total is at most 1.
    """
    for j in range(call):
        if ep.target in ep.retrieved[j]:
            return 0.0
    hits = np.flatnonzero(ep.retrieved[call] == ep.target)
    return float(1.0 / np.log2(hits[0] + 2.0)) if len(hits) else 0.0


def hit_index(ep: Episode) -> int | None:
    """0-based index of the first answer line grounded to the target (None if no line names it)."""
    for i, item in enumerate(ep.answer_ids):
        if item == ep.target:
            return i
    return None


def hit_reward(ep: Episode) -> float:
    """1 when an answer line names the target and ``format`` is 0, else 0."""
    return 1.0 if not ep.format_errors and hit_index(ep) is not None else 0.0


def rank_reward(ep: Episode, *, k: int = 10, step: float = 0.2) -> float:
    """``step * (k - i)`` for the first line ``i`` (0-based) that names the target, when ``format`` is 0.

    With ``hit`` this is the reference's outcome reward ``1 + 0.2 * (K - i)``.
    """
    i = hit_index(ep)
    return step * (k - i) if not ep.format_errors and i is not None else 0.0


def item_similarity(text_emb: np.ndarray, item_vecs: np.ndarray, a, b) -> np.ndarray:
    """``point``'s similarity ``(cos(text_a, text_b) + cos(trm_a, trm_b)) / 2`` between items ``a`` and ``b``.

    Item numbers or arrays of them (a matrix for two arrays), on unit rows; each cosine is taken in float64.
    """
    text = np.asarray(text_emb[a] @ text_emb[b].T, dtype=np.float64)
    trm = np.asarray(item_vecs[a] @ item_vecs[b].T, dtype=np.float64)
    return 0.5 * (text + trm)


def point_reward(
    ep: Episode, text_emb: np.ndarray, item_vecs: np.ndarray, *, scale: float = 10.0, repeats: bool = False
) -> float:
    """Graded similarity of the answer to the target, when ``format`` is 0.

    ``sim_i = (cos(text_i, text_target) + cos(trm_i, trm_target)) / 2`` for each answer line ``i``
    (0 for a line that names no item, and for a line repeating an earlier line's item unless ``repeats``);
    the result is ``scale * sum(w_i sim_i) / sum(w_i)`` with ``w_i = (1 - i / n)^2`` over the ``n``
    answer lines. ``text_emb`` and ``item_vecs`` are unit rows indexed by item number.

    ``repeats=True`` is the reference, which scores every line: there, the retrieved item closest to the
    target written ten times outscores the retrieved list itself (``docs/design.md``, "Rewards").
    """
    n = len(ep.answer_ids)
    if ep.format_errors or n == 0:
        return 0.0
    w = (1.0 - np.arange(n) / n) ** 2
    sims = np.zeros(n)
    named: set[int] = set()
    for i, item in enumerate(ep.answer_ids):
        if item is not None and (repeats or item not in named):
            named.add(item)
            sims[i] = item_similarity(text_emb, item_vecs, item, ep.target)
    return float(scale * (w @ sims) / w.sum())


def wasted_reward(ep: Episode, history) -> float:
    """Minus the share of answer lines that cannot name the target, when ``format`` is 0.

    A line is wasted when it names no item, repeats an earlier line's item, or names an item of the user's
    ``history`` (their items before the target; a line naming the target is never wasted). ``hit`` and
    ``rank`` price a wasted slot only when the target would have filled it; this prices every one.

    >>> ep = Episode(user=0, target=5, history=np.zeros(0), answer_ids=[5, 3, 3, None, 7])
    >>> wasted_reward(ep, history=[7, 5])
    -0.6
    """
    n = len(ep.answer_ids)
    if ep.format_errors or n == 0:
        return 0.0
    seen = set(np.asarray(history).tolist()) - {ep.target}
    named: set[int] = set()
    wasted = 0
    for item in ep.answer_ids:
        wasted += item is None or item in named or item in seen
        if item is not None:
            named.add(item)
    return -wasted / n
