"""Reward probe: which scripted answers does the stage-2 (``rec``) reward prefer, and is it the ranking?

Every episode makes one call (the shown history's top category), then answers with the same retrieved titles
in several ways; the table gives the mean reward, its ``point`` and ``hit + rank`` parts and NDCG@10. A reward
that prefers an answer with a lower NDCG is a direction RL can take instead of the ranking
(``docs/training.md``, "The CPU run").

    python -m benchmarks.reward_probe             # ~10 s on a 2-core CPU (TRM cached)
    python -m benchmarks.reward_probe --smoke     # synthetic data, seconds (used by the tests)
"""

from __future__ import annotations

import argparse
from functools import partial

import numpy as np

from agents.baselines import REASONING, top_categories, unseen_first
from benchmarks.common import markdown_table, publish, smoke_env_kwargs
from benchmarks.curriculum_cpu import CPU_ARGS
from deeprec_env.env import DeepRecEnv
from deeprec_env.protocol import answer_text, call_text, history_block, read_items
from deeprec_env.rewards import item_similarity


def answers(
    fresh: list[str], central: dict[str, float], to_history: dict[str, float], shown: list[str]
) -> dict[str, list[str]]:
    """The answers compared: ``fresh`` is the retrieved list with the shown history's titles moved last.

    ``shown`` (the prompt's history titles) makes one more answer: those titles copied first, then ``fresh``, cut to
    its length (items the user has consumed, so never the target: does ``point`` pay for copying them?).
    """
    copied = (shown + [t for t in fresh if t not in shown])[: len(fresh)]
    return {
        "TRM order (shown history last)": fresh,
        "TRM order reversed": fresh[::-1],
        "by centrality (mean similarity to the catalogue)": sorted(fresh, key=lambda t: -central[t]),
        "by similarity to the shown history": sorted(fresh, key=lambda t: -to_history[t]),
        "the first item written ten times": [fresh[0]] * len(fresh),
        "the shown history's titles first, then TRM order": copied,
    }


def probe(env_kwargs: dict, n: int) -> list[dict]:
    """Mean reward, point, hit + rank and NDCG@10 of each answer over the first ``n`` examples."""
    env = DeepRecEnv(**env_kwargs)
    cat, te, iv = env.catalog, env.res.text_emb, env.res.item_vecs
    first = {}
    for i in range(1, cat.num_embeddings):
        first.setdefault(cat.titles[i], i)
    sim = partial(item_similarity, te, iv)  # the point reward's similarity
    items = np.arange(1, cat.num_embeddings)
    mean_sim = sim(items, items).mean(1)
    central = {t: float(mean_sim[i - 1]) for t, i in first.items()}
    scores: dict[str, list[tuple[float, ...]]] = {}
    protocol = env.config.protocol
    for j in range(min(n, len(env.split))):
        obs, _ = env.reset(options={"example": j})
        shown = read_items(history_block(obs))
        call = call_text((top_categories(shown) or ["movies"])[0], protocol, "The history's top category.")
        retrieved = [t for t, _ in read_items(env.step(call)[0])]
        titles = {t for t, _ in shown}
        fresh = unseen_first(retrieved, titles, len(retrieved))
        hist = [first[t] for t in titles if t in first]
        to_history = dict(zip(retrieved, sim([first[t] for t in retrieved], hist).mean(1).tolist(), strict=True))
        for name, answer in answers(fresh, central, to_history, [t for t, _ in shown]).items():
            env.reset(options={"example": j})
            env.step(call)
            _, reward, _, _, info = env.step(answer_text(answer, protocol, REASONING))
            c = info["reward_components"]
            scores.setdefault(name, []).append((reward, c["point"], c["hit"] + c["rank"], info["metrics"]["ndcg@10"]))
    rows = []
    for name, values in scores.items():
        a = np.asarray(values)
        rows.append({"answer": name, "episodes": len(a), "reward": a[:, 0].mean(), "point": a[:, 1].mean(),
                     "hit + rank": a[:, 2].mean(), "ndcg@10": a[:, 3].mean()})  # fmt: skip
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=235, help="first N training examples (default 235)")
    ap.add_argument("--point-repeats", action="store_true", help="the reference's point rule (repeats score again)")
    ap.add_argument("--smoke", action="store_true", help="synthetic data, tiny TRM (seconds)")
    ap.add_argument("--encoder", default="minilm", help="text encoder (tests pass a tiny one)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    if args.episodes < 1:
        ap.error(f"--episodes {args.episodes}: must be >= 1")
    # the bundled CPU run's training episodes (benchmarks.curriculum_cpu)
    env_kwargs = {**CPU_ARGS.env_kwargs("rec"), "encoder": args.encoder, "point_repeats": args.point_repeats}
    if args.smoke:
        env_kwargs.update(smoke_env_kwargs(args.encoder))
    rows = probe(env_kwargs, args.episodes)
    protocol = {
        "data": f"{env_kwargs.get('dataset', 'ml-100k')}, test split (leave-one-out by time), the RL user group's "
        f"first {rows[0]['episodes']} examples (the bundled CPU run's training episodes)",
        "episode": "one call with the top category of the 5 history items the prompt shows, top-10 retrieved; "
        "every answer is these 10 titles (the shown history's last), reordered or repeated, except the last "
        "row's: the prompt's history titles copied first, then the retrieved ones",
        "reward": "rec = format + hit + rank + point (point x10 scale, weights (1 - i/n)^2), "
        f"point_repeats={args.point_repeats}",
        "history items": "not masked",
        "k": 10,
        "seed": "none drawn (the TRM's seed 0; the examples in order)",
    }
    table = markdown_table(rows, ["answer", "episodes", "reward", "point", "hit + rank", "ndcg@10"])
    publish("reward_probe", "Reward probe (stage 2)", table, protocol, {"rows": rows}, args.smoke, args.out)


if __name__ == "__main__":
    main()
