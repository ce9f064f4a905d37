"""The main job (``make demo``): every agent on the same ml-100k test users, under one protocol.

Agents: random, popularity, TRM only, the history-derived scripted agents, oracle preference (privileged
upper bound), PPO from stable-baselines3 on the numeric view (trained here briefly, or loaded with
--sb3-model), and two LLM rows on a fixed subset of the users: the SmolLM2-135M-Instruct policy zero-shot
and the same model with the LoRA adapter trained on this environment (``agents/adapters/smollm2-deeprec``,
made by ``python -m benchmarks.curriculum_cpu``; ``--trained`` names another checkpoint or adapter). Both
LLM rows play the episodes the adapter was trained on (its ``deeprec.json``: history shown, items per call,
tokens per segment). Prints the table with its protocol and writes JSON, markdown and a PNG.

    python -m benchmarks.main                         # ~10 min on a 2-core CPU; writes runs/main/
    python -m benchmarks.main --out benchmarks/results  # refresh the committed results (then benchmarks.report)
    python -m benchmarks.main --users 200 --llm-users 8 --device cuda --model Qwen/Qwen2.5-0.5B-Instruct \
        --trained runs/curriculum/rec/checkpoint
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from agents.evaluate import METRICS, EvalArgs, compare, run
from agents.llm import BUNDLED_ADAPTER
from benchmarks.common import environment, markdown_table, protocol_text, write_results
from benchmarks.report import ROOT
from deeprec_env.cli import device_option, positive_int
from deeprec_env.config import DTYPES

COLUMNS = ["agent", "episodes", *METRICS, "calls", "format_fail", "hallucinated", "seen", "seconds",
           "beats trm-only (NDCG@10, paired 95% CI)"]  # fmt: skip


def llm_settings(trained: str | None) -> tuple[dict, int | None]:
    """History shown, items per call and tokens per segment the trained checkpoint was made with.

    From its ``deeprec.json`` (an exported adapter) or ``trainer_state.json`` (a trainer's checkpoint);
    ``({}, None)`` (the scripted agents' episodes) when it has neither.
    """
    folder = Path(trained) if trained else None
    if folder is not None and (folder / "deeprec.json").is_file():
        settings = json.loads((folder / "deeprec.json").read_text())
        made, tokens = settings["episode"], settings.get("max_new_tokens")
    elif folder is not None and (folder / "trainer_state.json").is_file():
        made = json.loads((folder / "trainer_state.json").read_text()).get("args", {})
        tokens = made.get("max_new_tokens")
    else:
        return {}, None
    return {k: made[k] for k in ("prompt_history", "retrieval_k") if k in made}, tokens


def _shown(path: str) -> str:
    """``path`` relative to the repository when inside it (a protocol line that is the same in every clone)."""
    full = Path(path).resolve()
    return str(full.relative_to(ROOT)) if full.is_relative_to(ROOT) else path


def plot(summaries: list[dict], path: Path, title: str) -> None:
    """Bar chart of NDCG@10 and Recall@10 per agent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["agent"] + ("*" if s.get("privileged") else "") for s in summaries]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    ax.bar([i - 0.2 for i in x], [s["ndcg@10"] for s in summaries], width=0.4, label="NDCG@10")
    ax.bar([i + 0.2 for i in x], [s["recall@10"] for s in summaries], width=0.4, label="Recall@10")
    ax.set_xticks(list(x), names, rotation=20, ha="right")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--dataset-path", default=None)
    ap.add_argument("--split", default="test")
    ap.add_argument("--users", type=int, default=None, help="episodes per scripted agent (default: all users)")
    ap.add_argument("--llm-users", type=int, default=64, help="episodes for LLM agents (fixed subset)")
    ap.add_argument("--model", default="smollm2", help="'smollm2' (embedded), a hub id or a local path")
    ap.add_argument("--trained", default=str(BUNDLED_ADAPTER),
                    help="trained LLM: a checkpoint or adapter folder ('none': the zero-shot row only)")  # fmt: skip
    ap.add_argument("--device", type=device_option, default="cpu")
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--llm-batch-size", type=positive_int, default=32, help="LLM episodes generated in lock step")
    ap.add_argument("--sb3-model", default=None, help="saved PPO model (default: train one briefly)")
    ap.add_argument("--sb3-timesteps", type=positive_int, default=30000)
    ap.add_argument("--no-llm", action="store_true", help="skip the LLM agents")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out",
        default="runs/main",
        help="results folder (default runs/main; --out benchmarks/results refreshes the committed results)",
    )
    ap.add_argument("--runs", default="runs/main", help="folder for per-episode JSON lines")
    args = ap.parse_args(argv)
    trained = None if args.trained == "none" else args.trained
    if trained and not Path(trained).exists():
        ap.error(f"--trained {trained}: no such folder (run python -m benchmarks.curriculum_cpu, or pass 'none')")
    t0 = time.perf_counter()
    sb3_model = args.sb3_model or str(Path(args.runs) / "sb3-ppo.zip")  # given, or trained below
    agents = ["random", "popularity", "trm-only", "history-top-category", "history-facet", "trm-only-unseen",
              "history-top-category-unseen", "history-describer", "oracle-preference", "sb3-ppo"]  # fmt: skip
    try:  # settings the evaluation refuses, before PPO trains
        base = EvalArgs(
            agents=",".join(agents), dataset=args.dataset, dataset_path=args.dataset_path, split=args.split,
            users=args.users, llm_users=args.llm_users, batch_size=args.batch_size, model=args.model,
            device=args.device, dtype=args.dtype, sb3_model=sb3_model, seed=args.seed, out=args.runs,
        )  # fmt: skip
    except ValueError as e:  # named as EvalArgs' fields: users, llm_users, batch_size, split, device, ...
        ap.error(str(e))

    sb3_note = f"loaded from {sb3_model}"
    if args.sb3_model is None:
        from agents.sb3 import PPOArgs, learning_curve, train_ppo

        Path(args.runs).mkdir(parents=True, exist_ok=True)
        ppo = PPOArgs(timesteps=args.sb3_timesteps, dataset=args.dataset, seed=args.seed, out=sb3_model)
        print(f"training PPO on DeepRecNumeric-v0 (RL users) for {ppo.timesteps} steps ...", flush=True)
        ppo_model = train_ppo(ppo, env_kwargs={"dataset_path": args.dataset_path})
        curve = learning_curve(ppo_model.episode_returns)
        sb3_note = (f"PPO, {ppo.timesteps} steps on the RL group's {ppo.split} targets, n_steps {ppo.n_steps}, "
                    f"seed {ppo.seed}; mean training return over five equal parts of its "
                    f"{len(ppo_model.episode_returns)} episodes: {curve}")  # fmt: skip

    result = run(base, env_kwargs={"prompt": "chat"})
    summaries = result["summaries"]
    episode, max_new_tokens = llm_settings(trained)
    llm_note = "skipped"
    if not args.no_llm:
        llm = replace(base, agents="llm", batch_size=args.llm_batch_size,
                      max_new_tokens=max_new_tokens or EvalArgs.max_new_tokens)  # fmt: skip
        rows = [("llm (zero-shot)", args.model, "zero-shot")]
        if trained:
            rows.append(("llm (DeepRec-trained)", trained, "DeepRec-trained"))
        for label, model, folder in rows:
            extra = run(replace(llm, model=model, out=str(Path(args.runs) / folder)),
                        env_kwargs={"prompt": "chat", **episode})  # fmt: skip
            extra["summaries"][0]["agent"] = label
            summaries += extra["summaries"]
        shown = "the scripted agents' episodes"
        if episode:
            shown = (f"last {episode['prompt_history']} history items in the prompt and top-{episode['retrieval_k']} "
                     "per call (the trained model's episodes)")  # fmt: skip
        made = f" and with {_shown(trained)} (its settings: how it was made)" if trained else ""
        llm_note = "; ".join([
            f"{args.model} zero-shot{made}",
            f"greedy, {args.llm_users} users (the first of the same order), {shown}",
            f"at most {llm.max_new_tokens} new tokens per segment, {args.llm_batch_size} episodes in lock step",
            f"device {args.device}, dtype {args.dtype}",
        ])  # fmt: skip
    protocol = {
        **result["protocol"],
        "prompt": "chat variant (the LLM applies its chat template); scripted agents read the same text",
        "LLM": llm_note,
        "sb3-ppo": sb3_note,
        "privileged": "oracle-preference reads the target's categories: an upper bound, not an agent",
        "agents": "trm-only = one call without a preference, its top 10; history-top-category = one call with the "
        "history's most frequent category, its top 10; trm-only-unseen, history-top-category-unseen = the same, "
        "skipping titles in the prompt's history; history-facet = one call per frequent history category, merged "
        "by TRM score; "
        "history-describer = calls with no preference, the history's top category, 'like <last title>' and its "
        "decade, reciprocal-rank fusion, skipping seen titles",
        "beats trm-only": "mean per-episode NDCG@10 difference to trm-only on the same episodes, 95% bootstrap "
        "interval (2000 resamples); yes/no when it excludes 0, tie otherwise",
    }
    reference = next(x for x in summaries if x["agent"] == "trm-only")
    for x in summaries:
        x["beats trm-only (NDCG@10, paired 95% CI)"] = compare(x, reference, args.seed)
    table = markdown_table(summaries, COLUMNS)
    title = f"{args.dataset} {args.split}, full catalogue, leave-one-out, seed {args.seed}"
    text = f"## Agent comparison\n\n{table}\n\nProtocol:\n{protocol_text(protocol)}\n"
    print(text)
    out = Path(args.out)
    payload = {"benchmark": "main", "protocol": protocol, **environment(), "summaries": summaries,
               "args": vars(args), "env": result["env"], "seconds": time.perf_counter() - t0}  # fmt: skip
    js, md = write_results("main", payload, text, out)
    plot(summaries, out / "main.png", title)
    print(f"wrote {js}, {md} and {out / 'main.png'} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
