"""The preference probe table: how the TRM's ranking moves when a preference says one thing.

One row per probe, over every example of a split (one preference per example): no preference; the
target's full category list (privileged: nearly an identifier); each single category of the target;
the target's decade in words; "like <title>" of the item most often consumed next to the target; the
user's most frequent history category; the last history item's categories; one and two categories
the target does not have; and, per example, the best of the preferences an agent can write without the
target (none, the top category, the last item's categories), picked knowing the target: the most that
choosing among them user by user could gain. Next to the metrics: how many examples' top-10 hit the
preference changes against none (samples of one user that differ only in such a choice contrast on hits
for those users only); the mean release year of the top 20, the share of the top 20 that carries a
category the probe names, and the share in the decade it names, each with the same figure for no
preference on the same examples, so a reader sees the channel steer retrieval.
"""

from __future__ import annotations

import numpy as np

from deeprec_env.metrics import rank_metrics
from deeprec_env.preferences import (
    co_occurrence_neighbours,
    era_preference,
    item_years,
    like_preference,
    oracle_preference,
    top_history_categories,
    wrong_categories,
)
from deeprec_env.trm import rank_examples, trm_sequences

PROBE_COLUMNS = ["probe", "examples", "recall@10", "recall@20", "ndcg@10", "ndcg@20", "vs none", "top10 hit changed",
                 "top20 mean year", "top20 named category", "(none)", "top20 named decade", "(none) "]  # fmt: skip
KS_RECALL, KS_NDCG = (10, 20), (10, 20)
HONEST = ("none", "the history's top category", "the last history item's categories")
"""Probes an agent can write without the target; the best-of row picks among them per example."""
BEST_OF = "best of none, the history's top category or its last item's categories, per example (picked with the target)"
"""The most an agent could gain by choosing, user by user, among the :data:`HONEST` preferences: an upper bound."""


def probes(dataset, config, split: str = "test") -> dict[str, tuple[np.ndarray, list[str], str]]:
    """Probe name -> (example indices, preference texts, kind) for ``split``; kind marks privileged rows."""
    cat = dataset.catalog
    sp = dataset.split(split)
    years = item_years(cat)
    neighbours = co_occurrence_neighbours(trm_sequences(dataset, config), cat.num_embeddings, 1)
    n = len(sp)
    all_ex = np.arange(n)
    targets = [int(t) for t in sp.targets]
    hist = [sp.history(i, config.max_len) for i in range(n)]
    out: dict[str, tuple[np.ndarray, list[str], str]] = {"none": (all_ex, [""] * n, "")}
    out["oracle: the target's full category list (privileged)"] = (
        all_ex, [oracle_preference(cat, t) for t in targets], "privileged")  # fmt: skip
    ex, txt = zip(*[(i, c) for i, t in enumerate(targets) for c in cat.categories[t]], strict=True) or ((), ())
    out["one category of the target (each)"] = (np.asarray(ex, dtype=np.int64), list(txt), "target")
    era = [era_preference(years, t) for t in targets]
    keep = np.flatnonzero([bool(e) for e in era])
    out["the target's decade ('from the 1970s')"] = (keep, [era[i] for i in keep], "target")
    like = [like_preference(cat, neighbours, t) for t in targets]
    keep = np.flatnonzero([bool(e) for e in like])
    out["'like <title>' of the target's nearest neighbour"] = (keep, [like[i] for i in keep], "target")
    out["the history's top category"] = (all_ex, [top_history_categories(cat, h, 1) for h in hist], "history")
    out["the last history item's categories"] = (all_ex, ["; ".join(cat.categories[int(h[-1])]) for h in hist],
                                                "history")  # fmt: skip
    out["a category the target lacks"] = (all_ex, [wrong_categories(cat, t, 1) for t in targets], "wrong")
    out["two categories the target lacks"] = (all_ex, [wrong_categories(cat, t, 2) for t in targets], "wrong")
    return out


def probe_table(model, dataset, encoder, split: str = "test", exclude_history: bool = False) -> list[dict]:
    """Rows of the probe table (see the module docstring)."""
    cat = dataset.catalog
    sp = dataset.split(split)
    years = item_years(cat).astype(np.float64)
    hist = sp.histories(model.config.max_len)
    excl_all = [sp.history(i, 10**9) for i in range(len(sp))] if exclude_history else None
    rows, none_ranks, none_top, honest = [], None, None, {}
    for name, (ex, texts, kind) in probes(dataset, model.config, split).items():
        excl = [excl_all[i] for i in ex] if excl_all is not None else None
        ranks, top = rank_examples(model, hist[ex], sp.targets[ex], texts, encoder, exclude=excl, top=20)
        if name == "none":
            none_ranks, none_top = ranks, top
        base_top = none_top[ex]
        if name in HONEST:
            honest[name] = ranks
        row = _ranking_row(name, kind, ranks, none_ranks[ex])
        yrs = years[top]
        row["top20 mean year"] = f"{np.nanmean(np.where(yrs > 0, yrs, np.nan)):.1f}" if (yrs > 0).any() else "-"
        named = [set(t.split("; ")) & set(cat.all_categories) for t in texts]
        if any(named):
            row["top20 named category"] = f"{_share(top, named, cat):.2f}"
            row["(none)"] = f"{_share(base_top, named, cat):.2f}"
        decades = [_decade(t) for t in texts]
        if any(d is not None for d in decades):
            row["top20 named decade"] = f"{_decade_share(top, decades, years):.2f}"
            row["(none) "] = f"{_decade_share(base_top, decades, years):.2f}"
        rows.append(row)
    if len(honest) == len(HONEST):  # every honest probe covers every example: pick the best rank per example
        miss = np.iinfo(np.int64).max  # a -1 (excluded target) must not win the minimum
        best = np.stack([np.where(r >= 0, r, miss) for r in honest.values()]).min(axis=0)
        rows.append(_ranking_row(BEST_OF, "privileged", np.where(best == miss, -1, best), none_ranks))
    return rows


def _ranking_row(name: str, kind: str, ranks: np.ndarray, none_ranks: np.ndarray) -> dict:
    """A probe's metrics, its NDCG@10 over the no-preference one, and how many examples' top-10 hit it changes."""
    m = rank_metrics(ranks, KS_RECALL, KS_NDCG)
    base = rank_metrics(none_ranks, KS_RECALL, KS_NDCG)
    changed = int((((ranks >= 0) & (ranks < 10)) != ((none_ranks >= 0) & (none_ranks < 10))).sum())
    return {"probe": name, "kind": kind, "examples": len(ranks), **m, "top10 hit changed": changed,
            "vs none": f"{m['ndcg@10'] / base['ndcg@10']:.2f}x" if base["ndcg@10"] else "-"}  # fmt: skip


def _share(top: np.ndarray, named: list[set[str]], cat) -> float:
    """Mean share of each example's top items carrying at least one category its probe names."""
    pairs = zip(top, named, strict=True)
    out = [np.mean([bool(names & set(cat.categories[int(i)])) for i in items]) for items, names in pairs if names]
    return float(np.mean(out)) if out else float("nan")


def _decade(text: str) -> int | None:
    import re

    m = re.search(r"(\d{3}0)s", text)
    return int(m.group(1)) if m else None


def _decade_share(top: np.ndarray, decades: list[int | None], years: np.ndarray) -> float:
    out = [np.mean((years[items] // 10 * 10) == d) for items, d in zip(top, decades, strict=True) if d is not None]
    return float(np.mean(out)) if out else float("nan")
