"""RL headroom: do a policy's own samples find better episodes than its greedy one, and in which part?

Group-relative RL learns only from the differences between a user's G sampled episodes. For a starting
policy, this probe plays, on users stage 2 trains on, the greedy episode and G sampled episodes per temperature,
and counts what a GRPO step there could learn from (``docs/training.md``, "The CPU run"):

- groups whose samples differ in the reward, in retrieving the target (the call) and in ``hit``;
- users where a sample's call retrieved the target and the greedy call did not ("call found"), and the reverse
  ("call lost"): the retrieval RL on the calls could gain, and what sampling loses at that temperature;
- best-of-G NDCG@10 minus the greedy NDCG@10, over users: the most the samples find, any part of the episode;
- format failures of the samples.

    # stage 2's start (python -m benchmarks.curriculum_cpu writes it) and the bundled adapter, after stage 2: ~40 min
    python -m benchmarks.rl_headroom --model runs/curriculum-cpu/warmstart/checkpoint agents/adapters/smollm2-deeprec
    # a run on a fixed set (benchmarks.curriculum_cpu --train-users 8 ...), replayed on exactly its users
    python -m benchmarks.rl_headroom --model <warm start> <its stage-2 checkpoint> --users 8 --train-users 8
    python -m benchmarks.rl_headroom --smoke --model <tiny model> --encoder <tiny encoder>   # the tests
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
from tqdm.auto import tqdm

from agents.evaluate import interval_text, paired_difference
from agents.grpo import training_users
from agents.llm import BUNDLED_ADAPTER, LLMPolicy, load_causal_lm
from agents.rollout import collect_rollouts
from benchmarks.common import markdown_table, publish, smoke_env_kwargs
from benchmarks.curriculum_cpu import CPU_ARGS, changed_users
from deeprec_env.env import DeepRecEnv, EnvConfig, get_resources

COLUMNS = ["model", "temperature", "users", "samples", "reward differs", "retrieval differs", "hit differs",
           "target retrieved", "call found", "call lost", "reward", "ndcg@10", "best-of-G - greedy",
           "format failures", "greedy - first model's (95% CI)", "better / worse"]  # fmt: skip
"""The table's columns (``summarize``'s keys; the last two: a greedy row's per-user NDCG@10 paired with the
first model's greedy row, on the same users)."""


def summarize(greedy: list, sampled: list, group_size: int) -> dict:
    """Counts of one temperature: ``greedy`` has one record per user, ``sampled`` ``group_size`` per user after it.

    Records are :class:`agents.base.EpisodeRecord` (``retrieved_rank`` >= 0: a call retrieved the target).

    >>> from types import SimpleNamespace as N
    >>> ep = lambda r, ret, hit, ndcg: N(reward=r, retrieved_rank=ret, format_errors=[],
    ...     episode_reward_components={"hit": hit}, metrics={"ndcg@10": ndcg})
    >>> row = summarize([ep(1, -1, 0, 0.0)], [ep(1, -1, 0, 0.0), ep(2, 3, 1, 0.5)], 2)
    >>> row["retrieval differs"], row["call found"], row["call lost"], row["best-of-G - greedy"]
    (1, 1, 0, 0.5)
    """
    n = len(greedy)
    if len(sampled) != n * group_size:
        raise ValueError(f"{len(sampled)} sampled records for {n} users x group_size={group_size}")

    def matrix(get) -> np.ndarray:
        return np.array([get(r) for r in sampled], dtype=float).reshape(n, group_size)

    reward = matrix(lambda r: r.reward)
    retrieved = matrix(lambda r: r.retrieved_rank >= 0)
    hit = matrix(lambda r: r.episode_reward_components["hit"])
    ndcg = matrix(lambda r: r.metrics["ndcg@10"])
    greedy_retrieved = np.array([r.retrieved_rank >= 0 for r in greedy])
    greedy_ndcg = np.array([r.metrics["ndcg@10"] for r in greedy], dtype=float)

    def differs(m: np.ndarray) -> int:
        return int((np.ptp(m, axis=1) > 1e-9).sum())

    return {
        "users": n,
        "samples": n * group_size,
        "reward differs": differs(reward),
        "retrieval differs": differs(retrieved),
        "hit differs": differs(hit),
        "target retrieved": float(retrieved.mean()),
        "call found": int((retrieved.any(axis=1) & ~greedy_retrieved).sum()),
        "call lost": int((~retrieved.all(axis=1) & greedy_retrieved).sum()),
        "reward": float(reward.mean()),
        "ndcg@10": float(ndcg.mean()),
        "best-of-G - greedy": float((ndcg.max(axis=1) - greedy_ndcg).mean()),
        "format failures": float(np.mean([bool(r.format_errors) for r in sampled])),
    }


def versus(ndcg: dict, first: dict, seed: int) -> dict:
    """A greedy row's paired NDCG@10 difference to the first model's greedy row ('-' for that row itself).

    >>> versus({0: 0.5, 1: 0.0}, {0: 0.0, 1: 0.0}, 0)["better / worse"]
    '1 / 0'
    """
    if ndcg is first:
        return {"greedy - first model's (95% CI)": "-", "better / worse": "-"}
    mean, lo, hi, _ = paired_difference(ndcg, first, seed)
    records = [[{"example": k, "ndcg@10": v} for k, v in d.items()] for d in (first, ndcg)]
    changed = changed_users(*records)  # the count curriculum_cpu's validation reports
    return {"greedy - first model's (95% CI)": interval_text(mean, lo, hi),
            "better / worse": "{better} / {worse}".format(**changed)}  # fmt: skip


def probe(models: list[str], env_kwargs: dict, n_users: int, group_size: int, temperatures: list[float], *, seed: int,
          batch: int, max_new_tokens: int, train_users: int = 0,
          progress: bool = True) -> tuple[list[dict], list[int]]:  # fmt: skip
    """Per model, the greedy row (temperature 0) and one row per temperature, on ``n_users`` of stage 2's users.

    ``train_users``: draw them from the first that many of stage 2's users, the fixed set a stage-2 run with
    the same ``train_users`` trains on (0: all of them).
    """
    res = get_resources(EnvConfig(**env_kwargs))
    envs = [DeepRecEnv(resources=res, **env_kwargs) for _ in range(batch)]
    pool = training_users(envs[0], replace(CPU_ARGS, users="second-half", train_users=train_users))
    if len(pool) < n_users:
        raise SystemExit(f"--users {n_users}: stage 2 has {len(pool)} training users to draw from")
    users = [int(u) for u in np.random.default_rng(seed).choice(pool, size=n_users, replace=False)]
    rows, first = [], None
    for model in models:
        lm, tok = load_causal_lm(model)
        lm.eval()
        greedy = _play(lm, tok, envs, users, 0.0, 1, seed, batch, max_new_tokens, progress)
        ndcg = {i: r.metrics["ndcg@10"] for i, r in enumerate(greedy)}
        first = ndcg if first is None else first
        rows.append({"model": model, "temperature": "0 (greedy)", **summarize(greedy, greedy, 1),
                     **versus(ndcg, first, seed)})  # fmt: skip
        for t in temperatures:
            sampled = _play(lm, tok, envs, users, t, group_size, seed, batch, max_new_tokens, progress)
            rows.append({"model": model, "temperature": f"{t:g}", **summarize(greedy, sampled, group_size)})
    return rows, users


def _play(lm, tok, envs: list, users: list[int], temperature: float, g: int, seed: int, batch: int,
          max_new_tokens: int, progress: bool) -> list:  # fmt: skip
    """Records of ``g`` episodes per user at ``temperature`` (0: greedy), ``batch`` users at a time, user by user."""
    policy = LLMPolicy(lm, tok, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, name="probe")
    out = []
    for s in tqdm(range(0, len(users), batch), desc=f"T={temperature}", disable=not progress, leave=False):
        out += [ro.record for ro in collect_rollouts(policy, envs, users[s : s + batch], g, batch_size=batch)]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=[str(BUNDLED_ADAPTER)],
                    help="policies: model or adapter folders, or hub ids (default: the bundled adapter)")  # fmt: skip
    ap.add_argument("--users", type=int, default=24, help="users, drawn from stage 2's training users (default 24)")
    ap.add_argument("--train-users", type=int, default=0,
                    help="draw the users from the first N of stage 2's users, the fixed set a run with "
                    "benchmarks.curriculum_cpu --train-users N trains on (default 0: all of them)")  # fmt: skip
    ap.add_argument("--group-size", type=int, default=4, help="samples per user and temperature (default 4, G)")
    ap.add_argument("--temperatures", default="0.7,1.0,1.5", help="comma-separated (default 0.7,1.0,1.5)")
    ap.add_argument("--seed", type=int, default=0, help="draws the users and seeds the sampling (default 0)")
    ap.add_argument("--batch", type=int, default=8, help="episodes generated together (default 8)")
    ap.add_argument("--smoke", action="store_true", help="synthetic data, tiny TRM (seconds with a tiny model)")
    ap.add_argument("--encoder", default="minilm", help="text encoder (tests pass a tiny one)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    try:
        temperatures = [float(t) for t in args.temperatures.split(",")]
    except ValueError:
        ap.error(f"--temperatures {args.temperatures!r}: need comma-separated numbers")
    if any(not t > 0 for t in temperatures):
        ap.error(f"--temperatures {args.temperatures!r}: each must be > 0 (the greedy row is always played)")
    for flag in ("users", "group_size", "batch"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.train_users < 0:
        ap.error(f"--train-users {args.train_users}: must be >= 0 (0: all)")
    env_kwargs = {**CPU_ARGS.env_kwargs("rec"), "encoder": args.encoder}
    if args.smoke:
        env_kwargs.update(smoke_env_kwargs(args.encoder))
    max_new = 8 if args.smoke else CPU_ARGS.max_new_tokens
    rows, users = probe(args.model, env_kwargs, args.users, args.group_size, temperatures, seed=args.seed,
                        batch=args.batch, max_new_tokens=max_new, train_users=args.train_users)  # fmt: skip
    protocol = {
        "model": ", ".join(args.model) + " (each row's)",
        "data": f"{env_kwargs['dataset']}, test split (leave-one-out by time): {args.users} users drawn (seed "
        f"{args.seed}) from stage 2's training users (the RL group's second half, target in the TRM's top "
        f"{CPU_ARGS.difficulty_top}; benchmarks.curriculum_cpu)"
        + (f", only the first {args.train_users} of them (a run's --train-users)" if args.train_users else ""),
        "episode": f"chat prompt with the last {CPU_ARGS.prompt_history} history items, top-{CPU_ARGS.retrieval_k} "
        f"items per call, at most {max_new} new tokens per segment (benchmarks.curriculum_cpu's)",
        "sampling": f"G={args.group_size} episodes per user at each temperature, top-k and top-p off, one seeded "
        "generator per temperature; the greedy row plays each user once",
        "reward differs / retrieval differs / hit differs": "groups (users) whose G samples differ in the rec "
        "reward / in whether a call retrieved the target / in hit",
        "target retrieved": "share of episodes where a call's retrieved list held the target",
        "reward / ndcg@10": "means over the row's episodes (reward: the stage's weighted episode reward, what RL "
        "maximises)",
        "call found / call lost": "users where a sample's call retrieved the target and the greedy call did not / "
        "where the greedy call did and a sample's did not",
        "best-of-G - greedy": "mean over users of the best sample's NDCG@10 minus the greedy episode's",
        "greedy - first model's": "a greedy row's per-user NDCG@10 minus the first model's greedy one on the same "
        f"users, 95% bootstrap interval (2000 resamples, seed {args.seed}); better / worse: users it rose / fell for",
        "k": 10,
    }
    table = markdown_table(rows, COLUMNS)
    publish("rl_headroom", "RL headroom: what a policy's samples find", table, protocol, {"rows": rows, "users": users},
            args.smoke, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
