"""One evaluation entry point: agents x dataset x split x users -> JSON lines records and a summary.

    python -m agents.evaluate --agents trm-only,oracle-preference --users 200
    python -m agents.evaluate --agents llm --llm-users 16 --model smollm2

Every agent plays the same episodes (the first ``users`` examples of a permutation of the split
seeded by ``--seed``; LLM agents the first ``llm_users`` of them) in the same environment
configuration, so their numbers are comparable. The environment accepts an empty preference here
(``allow_empty_preference``) so that the TRM-only agent can call the TRM without one.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from agents.base import EpisodeRecord, Policy, run_episodes
from agents.baselines import BASELINES
from deeprec_env.config import Device, Dtype, check_fields
from deeprec_env.env import DeepRecEnv, EnvConfig, Resources, episode_split, get_resources
from deeprec_env.trm import weights_digest, weights_line

METRICS = ("recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10")
KNOWN_AGENTS = (*BASELINES, "llm", "sb3-ppo")
"""Every agent name :func:`make_policy` builds."""


@dataclass(frozen=True)
class EvalArgs:
    """Settings of an evaluation run (the CLI is generated from these fields)."""

    agents: str = "random,popularity,trm-only,history-facet,oracle-preference"
    """Comma-separated agent names: random, popularity, trm-only, history-facet, oracle-preference,
    llm (the LLM policy zero-shot), sb3-ppo (needs --sb3-model)."""
    dataset: str = "ml-100k"
    """Dataset name (see deeprec_env.data.load_dataset)."""
    dataset_path: str | None = None
    """File or folder for datasets other than ml-100k."""
    split: Literal["train", "valid", "test"] = "test"
    """train, valid or test."""
    user_group: Literal["all", "rl", "eval"] = "eval"
    """all, rl or eval: whose examples (``eval`` by default: users the bundled trainers never train on)."""
    users: int | None = None
    """Episodes per scripted agent (None: every user of the split)."""
    llm_users: int = 16
    """Episodes per LLM agent (the first of the same user order)."""
    batch_size: int = 8
    """Episodes run in lock step (the LLM generates for all of them at once)."""
    model: str = "smollm2"
    """LLM: 'smollm2' (embedded SmolLM2-135M-Instruct), a hub id or a local path."""
    device: Device = "cpu"
    """Torch device for the LLM."""
    dtype: Dtype = "float32"
    """Torch dtype for the LLM."""
    max_new_tokens: int = 256
    """LLM tokens per segment."""
    sb3_model: str | None = None
    """Path of a saved stable-baselines3 PPO model for the sb3-ppo agent."""
    seed: int = 0
    """Seed of the user order and of sampling agents."""
    out: str = "runs/eval"
    """Folder for <agent>.jsonl, summary.json and summary.md."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.users is not None and self.users < 1:
            raise ValueError(f"users={self.users}; must be >= 1 (None: every user of the split)")
        for name in ("llm_users", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; must be >= 1")
        names = agent_names(self.agents)
        unknown = [n for n in names if n not in KNOWN_AGENTS]
        if not names or unknown:
            raise ValueError(f"agents={self.agents!r}: {'unknown ' + repr(unknown) if unknown else 'no agent'}; known: "
                             f"{', '.join(KNOWN_AGENTS)}")  # fmt: skip
        if "sb3-ppo" in names and not self.sb3_model:
            raise ValueError("agent sb3-ppo needs sb3_model (--sb3-model <path of a saved PPO model>)")


def agent_names(agents: str) -> list[str]:
    """The names of a comma-separated agent list (blanks dropped)."""
    return [a.strip() for a in agents.split(",") if a.strip()]


def episode_options(n_examples: int, users: int | None, seed: int) -> list[dict]:
    """The shared episode order: ``{"example": j}`` for the first ``users`` of a seeded permutation."""
    order = np.random.default_rng(seed).permutation(n_examples)
    return [{"example": int(j)} for j in order[: users or n_examples]]


def evaluate_agent(
    policy: Policy,
    env_kwargs: dict,
    options: list[dict],
    *,
    batch_size: int = 8,
    progress: bool = True,
    resources: Resources | None = None,
) -> list[EpisodeRecord]:
    """Run ``policy`` on every episode of ``options`` (``batch_size`` at a time, in lock step).

    ``resources`` hands the environments resources already built (default: :func:`get_resources`).
    """
    from tqdm.auto import tqdm

    kwargs = {**env_kwargs, "allow_empty_preference": True}
    resources = resources or get_resources(EnvConfig(**kwargs), progress=progress)
    envs = [DeepRecEnv(resources=resources, **kwargs) for _ in range(batch_size)]
    records: list[EpisodeRecord] = []
    with tqdm(total=len(options), desc=policy.name, disable=not progress, unit="ep") as bar:
        for s in range(0, len(options), batch_size):
            chunk = options[s : s + batch_size]
            records.extend(run_episodes(policy, envs[: len(chunk)], chunk))
            bar.update(len(chunk))
    return records


def summarize(records: list[EpisodeRecord]) -> dict:
    """Means over episodes: metrics, calls, tokens, seconds, format failures and answer-line rates."""
    n = len(records)
    lines = max(1, sum(len(r.answer_ids) for r in records))
    out = {"agent": records[0].agent if records else "", "episodes": n}
    for m in METRICS:
        out[m] = float(np.mean([r.metrics[m] for r in records])) if n else 0.0
    out.update(
        reward=float(np.mean([r.reward for r in records])) if n else 0.0,
        calls=float(np.mean([r.calls for r in records])) if n else 0.0,
        tokens=float(np.mean([r.tokens for r in records])) if n else 0.0,
        seconds=float(np.mean([r.seconds for r in records])) if n else 0.0,
        format_fail=float(np.mean([bool(r.format_errors) for r in records])) if n else 0.0,
        hallucinated=sum(r.hallucinated for r in records) / lines,
        seen=sum(r.seen for r in records) / lines,
    )
    return out


def make_policy(name: str, args: EvalArgs) -> Policy:
    """Build an agent by name."""
    if name in BASELINES:
        cls = BASELINES[name]
        return cls(seed=args.seed) if name == "random" else cls()
    if name == "llm":
        from agents.llm import LLMPolicy

        return LLMPolicy(args.model, device=args.device, dtype=args.dtype, max_new_tokens=args.max_new_tokens)
    if name == "sb3-ppo":
        from agents.sb3 import SB3Policy

        if not args.sb3_model:
            raise ValueError("agent sb3-ppo needs --sb3-model <path of a saved PPO model>")
        return SB3Policy(args.sb3_model)
    raise ValueError(f"unknown agent {name!r}; known: {', '.join(KNOWN_AGENTS)}")


def run(args: EvalArgs, env_kwargs: dict | None = None, progress: bool = True) -> dict:
    """Evaluate every agent of ``args``; write JSON lines per agent plus summary.json / summary.md."""
    env_kwargs = {"dataset": args.dataset, "dataset_path": args.dataset_path, "split": args.split,
                  "user_group": args.user_group, **(env_kwargs or {})}  # fmt: skip
    config = EnvConfig(**env_kwargs)
    if config.target_hint:
        raise ValueError("target_hint=True gives the target's categories away in the prompt: a check of a trainer "
                         "(docs/training.md), never an evaluation setting")  # fmt: skip
    res = get_resources(config, progress=progress)
    n_examples = len(episode_split(config, res.dataset))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for name in agent_names(args.agents):
        policy = make_policy(name, args)
        users = args.llm_users if name == "llm" else args.users
        options = episode_options(n_examples, users, args.seed)
        t = time.perf_counter()
        records = evaluate_agent(policy, env_kwargs, options, batch_size=args.batch_size, progress=progress,
                                 resources=res)  # fmt: skip
        with open(out / f"{name}.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(asdict(r), default=int) + "\n")
        s = summarize(records)
        s.update(agent=name, privileged=policy.privileged, wall_s=time.perf_counter() - t)
        s["per_episode_ndcg@10"] = {
            int(o["example"]): r.metrics["ndcg@10"] for o, r in zip(options, records, strict=True)
        }
        summaries.append(s)
    config = EnvConfig(**{**env_kwargs, "allow_empty_preference": True})
    protocol = {
        "dataset": f"{res.dataset.name} ({res.dataset.n_users} users, {res.dataset.n_items} items)",
        "split": f"{args.split} (leave-one-out by time), users: {args.user_group} group"
        + (
            f" ({len(res.dataset.user_group(config.user_group, config.rl_share, config.group_seed))} of "
            f"{res.dataset.n_users}; the RL group, share {config.rl_share}, seed {config.group_seed}, is for training)"
            if config.user_group != "all"
            else ""
        ),
        "users": f"first {args.users or n_examples} of a permutation seeded {args.seed}; LLM agents the first "
        f"{args.llm_users}",
        "ranking": "the agent's 10-line answer grounded to catalogue ids; a failed or malformed episode is a miss",
        "history items": "masked" if config.mask_history else "not masked",
        "retrieval": f"top-{config.retrieval_k} per call, dedup {config.dedup_retrieved}, budget {config.max_calls}",
        "k": config.answer_k,
        "seed": args.seed,
        "trm": trm_line(res.retriever),
    }
    result = {"protocol": protocol, "args": asdict(args), "env": _plain(asdict(config)), "summaries": summaries}
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def trm_line(retriever) -> str:
    """The protocol's TRM line: the weights' digest, since other machines may train other weights."""
    trm = getattr(retriever, "trm", None)
    if trm is None:
        return f"{type(retriever).__name__} (no local weights)"
    return weights_line(weights_digest(trm))


def paired_difference(a: dict, b: dict, seed: int = 0, n: int = 2000) -> tuple[float, float, float, int]:
    """Mean of ``a[k] - b[k]`` over the keys both have, its 95% bootstrap interval, and the number of keys."""
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("no episode in common: a paired difference needs the same episodes")
    d = np.array([a[k] - b[k] for k in common])
    boot = d[np.random.default_rng(seed).integers(0, len(d), (n, len(d)))].mean(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return float(d.mean()), float(lo), float(hi), len(d)


def interval_text(mean: float, lo: float, hi: float) -> str:
    """``+0.0123 [+0.0040, +0.0210]``: a difference and its interval, as every table prints them."""
    return f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def compare(summary: dict, reference: dict, seed: int = 0, n: int = 2000) -> str:
    """Whether ``summary``'s agent beats ``reference``'s on NDCG@10, paired on the episodes both played.

    Returns e.g. ``"yes: +0.0123 [+0.0040, +0.0210]"``: the mean per-episode difference with its 95%
    bootstrap interval; "yes" / "no" when the interval excludes 0, "tie" when it does not.
    """
    a, b = summary["per_episode_ndcg@10"], reference["per_episode_ndcg@10"]
    if summary is reference or not set(a) & set(b):
        return "-"
    mean, lo, hi, _ = paired_difference(a, b, seed, n)
    verdict = "yes" if lo > 0 else "no" if hi < 0 else "tie"
    return f"{verdict}: {interval_text(mean, lo, hi)}"


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x if isinstance(x, str | int | float | bool | type(None)) else str(x)


def main(argv=None) -> None:
    """CLI built from :class:`EvalArgs`."""
    from deeprec_env.cli import add_dataclass_args, from_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(ap, EvalArgs)
    args = from_args(EvalArgs, ap.parse_args(argv), parser=ap)
    result = run(args)
    cols = ["agent", "episodes", *METRICS, "calls", "format_fail", "hallucinated", "seen", "seconds"]
    print(" | ".join(cols))
    for s in result["summaries"]:
        print(" | ".join(f"{s[c]:.4f}" if isinstance(s[c], float) else str(s[c]) for c in cols))
    print(json.dumps(result["protocol"], indent=2))


if __name__ == "__main__":
    main()
