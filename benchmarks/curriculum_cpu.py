"""Stage 2 on a CPU: SmolLM2-135M with a LoRA adapter on the embedded ml-100k, validated before and after.

    python -m benchmarks.curriculum_cpu             # ~69 min on a 2-core CPU (cache holding the TRM and SmolLM2)
    python -m benchmarks.curriculum_cpu --smoke     # tiny synthetic run (seconds; used by the tests)

``--format-weight``, ``--point-weight``, ``--retrieval-hit-weight``, ``--wasted-weight``, ``--difficulty-top``,
``--lr``, ``--temperature``, ``--kl-coef``, ``--train-segments``, ``--mask-history``, the episode's size
(``--prompt-history``, ``--retrieval-k``), the warm start's (``--warmstart-teacher``, ``--warmstart-episodes``,
``--warmstart-epochs``) and the step's (``--steps``, ``--users-per-step``, ``--group-size``) make variants (with
``--run`` and ``--out`` of their own); ``--rollout-batch``, ``--micro-batch``, ``--micro-batch-tokens``,
``--kl-reference`` and ``--share-prefix`` or ``--gradient-checkpointing`` set how a step runs (memory, speed). Only the
default settings export the bundled adapter unless ``--export`` says where.

1. Warm start (``agents.sft``): a LoRA adapter fine-tuned on transcripts of ``history-top-category-unseen``
   (one call with the history's top category, then the retrieved titles that are not in the prompt's
   history). SmolLM2-135M never calls the tool by itself, so RL cannot start from it (``docs/training.md``).
2. Greedy validation of the warm start on ``VAL_USERS`` fixed users (the evaluation group's valid targets).
3. Stage 2 (``rec`` rewards: format, hit, rank, point) for ``STEPS["rec"]`` steps, continuing the adapter
   (``agents.curriculum``; stage 1 is skipped with ``STEPS["coldstart"] = 0``: the warm start already calls).
4. Greedy validation after stage 2 on the same users: the per-user paired NDCG@10 difference with a 95%
   bootstrap interval, and recall, format failures, calls.

Writes ``benchmarks/results/curriculum_cpu/`` (``log.jsonl``, ``warmstart.jsonl``, ``validation.json``,
``curves.png``, ``settings.json`` and ``README.md``) and copies the final adapter to ``--export`` (the full
run: ``agents/adapters/smollm2-deeprec``, the ``llm (DeepRec-trained)`` row of ``make demo``). Re-running
resumes the run folder; a larger ``--steps`` continues stage 2 and validates the new checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
import typing
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from agents.baselines import BASELINES, HintMixPolicy, UnseenMixPolicy
from agents.curriculum import run_curriculum
from agents.evaluate import trm_line
from agents.grpo import GRPOArgs
from agents.llm import BUNDLED_ADAPTER
from agents.rollout import episode_settings
from agents.runs import run_folder_errors, run_state
from agents.sft import SFTArgs, train_sft
from benchmarks.common import RESULTS, markdown_table, protocol_text
from deeprec_env.cli import device_option
from deeprec_env.config import DTYPES
from deeprec_env.env import EnvConfig, get_resources
from deeprec_env.protocol import copies_hint, preference_phrases
from deeprec_env.rewards import STAGES, weighted_reward

CPU_ARGS = GRPOArgs(users_per_step=2, group_size=4, rollout_batch=8, micro_batch=2, prompt_history=5,
                    retrieval_k=10, lr=2e-4, lora_r=8, mini_batches=2, val_users=0, temperature=0.7,
                    out="runs/curriculum-cpu")  # fmt: skip
"""Stage settings of the CPU run (every other field at its GRPOArgs default): 5 history items in the prompt and
10 items per call keep an episode near 1,100 tokens; two optimiser steps per rollout batch, as the paper; lr 2e-4
(at 1e-4 the clip bound at the first step only); sampling temperature 0.7 (at 1.0, the paper's, a 135M model's
samples fail the format far more often than its greedy answers: 20% of them after the 12-step warm start, 88% after
an 8-step one, where greedy failed 5%; the loss uses the same temperature, so the run stays on-policy).
Validation runs in this script, before and after the stage, on ``VAL_USERS`` users."""
CPU_WARM = SFTArgs(teacher="history-top-category-unseen", episodes=32, epochs=3, batch=8, micro_batch=2, lr=1e-3,
                   lora_r=8)  # fmt: skip
"""Warm-start settings: a LoRA adapter of rank 8 on every linear layer (LoRA takes a larger learning rate than full
fine-tuning), three epochs (12 steps). Shorter warm starts were too weak a start for RL: after 1 epoch every greedy
validation episode failed the format (0.19 calls per episode); after 2 epochs greedy failed 5%, but 88% of the
samples of stage 2's first step and all of the next four, so every advantage was 0 (``NOTES.md``)."""
_DTYPE_TEXT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

TEACHERS = [*sorted(name for name, cls in BASELINES.items() if not cls.privileged), UnseenMixPolicy.name,
            HintMixPolicy.name]  # fmt: skip
"""Scripted agents a warm start may imitate (``--warmstart-teacher``; never one that reads the target, and
``hint-mix`` only with ``--target-hint``, where the prompt gives the target's categories away)."""


def teacher_text(warm: SFTArgs) -> str:
    """The warm start's teacher as the protocol names it (with history-facet's draw of call counts).

    >>> teacher_text(replace(CPU_WARM, teacher="history-facet"))
    'history-facet (1, 2 or 3 calls, drawn per transcript)'
    >>> teacher_text(replace(CPU_WARM, teacher="hint-mix", teacher_hint_share=0.25))[:52]
    "hint-mix (the call copies the prompt's hint in 0.25 "
    >>> teacher_text(replace(CPU_WARM, teacher="unseen-mix", teacher_unseen_share=0.25))[:60]
    "unseen-mix (the history's top category; the answer skips the"
    """
    if warm.teacher == HintMixPolicy.name:
        return (f"{warm.teacher} (the call copies the prompt's hint in {warm.teacher_hint_share:g} of the "
                "transcripts, drawn per transcript; otherwise the history's top category)")  # fmt: skip
    if warm.teacher == UnseenMixPolicy.name:
        return (f"{warm.teacher} (the history's top category; the answer skips the prompt's history titles in "
                f"{warm.teacher_unseen_share:g} of the transcripts, drawn per transcript, and lists the call's "
                "items as they came otherwise)")  # fmt: skip
    if warm.teacher != "history-facet":
        return warm.teacher
    *head, last = map(str, warm.teacher_calls)
    counts = f"{', '.join(head)} or {last}" if head else last
    return f"{warm.teacher} ({counts} calls, drawn per transcript)"


STEPS = {"coldstart": 0, "rec": 24}
"""Optimiser steps per stage: stage 1 skipped, 24 steps of stage 2 (192 sampled episodes). A run of 8 steps at lr 1e-4
(64 episodes, 9 hits; git history) moved the validation NDCG@10 by +0.0005: too small a signal."""
VAL_USERS = 64
"""Fixed validation users, evaluated greedily before and after stage 2 (64: a tighter paired interval than 32, for
about two minutes per validation). ``--val-users`` sets another number (ml-100k's evaluation group has 471)."""
VAL_BATCH = 64
"""Validation episodes generated together (greedy; more would hold more KV cache than a 24 GiB machine has)."""


def validation_file(run: Path, when: str, n_users: int, step: int | None = None) -> Path:
    """Cache file of a validation in ``run`` (``when``: ``before`` or ``after``; ``step``: the stage-2 steps done).

    ``val_before.jsonl`` for :data:`VAL_USERS` users, ``val_before_471.jsonl`` for 471: a larger validation of the
    same checkpoints keeps the first. The "after" of the checkpoint after 7 steps is ``val_after_step7.jsonl``: a run
    continued with a larger ``--steps`` validates its new checkpoint, and the older file stays.
    """
    stem = f"val_{when}" if step is None else f"val_{when}_step{step}"
    return run / (f"{stem}.jsonl" if n_users == VAL_USERS else f"{stem}_{n_users}.jsonl")


def cache_contents() -> str:
    """What the cache holds before the run (a fresh machine trains the TRM and converts SmolLM2 first)."""
    from deeprec_env.data import cache_dir

    root = cache_dir()
    parts = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.iterdir())) if root.is_dir() else []
    return ", ".join(parts) if parts else "empty"


def validation(checkpoint: Path, base: GRPOArgs, env_kwargs: dict | None, n_users: int, cache: Path) -> list[dict]:
    """Greedy episodes of ``checkpoint`` on the fixed validation users (cached in ``cache``, a JSON-lines file)."""
    if cache.is_file():
        return [json.loads(x) for x in cache.read_text().splitlines()]
    from agents.llm import LLMPolicy
    from agents.runs import validation_records

    policy = LLMPolicy(str(checkpoint), device=base.device, dtype=base.dtype, max_new_tokens=base.max_new_tokens)
    kwargs = base.env_kwargs("rec", env_kwargs)
    recs = validation_records(policy, kwargs, n_users, batch_size=VAL_BATCH)
    rows = [{"example": i, **r.metrics, "calls": r.calls, "format_fail": float(bool(r.format_errors)),
             "hallucinated": r.hallucinated, "seen": r.seen, "duplicates": r.duplicates, "reward": r.reward,
             "components": dict(r.episode_reward_components), "retrieved_rank": r.retrieved_rank,
             "from_retrieved": r.from_retrieved, "shown": r.shown, "preferences": list(r.preferences)}
            for i, r in enumerate(recs)]  # fmt: skip
    if kwargs.get("target_hint"):  # the positive control: how many calls wrote the hint's categories
        categories = get_resources(EnvConfig(**kwargs)).dataset.catalog.categories
        for row, r in zip(rows, recs, strict=True):
            hint = {c.lower() for c in categories[r.target]}
            row["hint_calls"] = sum(copies_hint(p, categories[r.target]) for p in r.preferences)
            row["hint_category_calls"] = sum(bool(preference_phrases(p) & hint) for p in r.preferences)
    cache.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def scripted_validation(base: GRPOArgs, env_kwargs: dict | None, n_users: int, names: tuple[str, ...],
                        llm: dict[str, list[dict]], seed: int) -> list[dict]:  # fmt: skip
    """NDCG@10 / Recall@10 of scripted agents on the same validation users (the scale the LLM's figures sit on).

    ``llm`` maps ``"before"`` / ``"after"`` to the LLM's validation rows; each agent's row adds the LLM's paired
    per-user NDCG@10 difference to it with a 95% bootstrap interval (whether the LLM beats ``trm-only``).
    """
    from agents.baselines import BASELINES
    from agents.evaluate import interval_text, paired_difference, summarize
    from agents.runs import validation_records

    rows = []
    for name in names:
        recs = validation_records(BASELINES[name](), base.env_kwargs("rec", env_kwargs), n_users)
        s = summarize(recs)
        row = {"agent": name, "ndcg@10": s["ndcg@10"], "recall@10": s["recall@10"]}
        theirs = {i: r.metrics["ndcg@10"] for i, r in enumerate(recs)}  # the LLM rows' "example" is the same index
        for when, mine in llm.items():
            mean, lo, hi, _ = paired_difference({r["example"]: r["ndcg@10"] for r in mine}, theirs, seed)
            row[f"LLM {when} - agent (95% CI)"] = interval_text(mean, lo, hi)
        rows.append(row)
    return rows


WELL_FORMED = "ndcg@10, users well-formed before and after"
"""The row that separates ranking from format: NDCG@10 on the users whose answer passed the format checks both
before and after (a failed format is a miss, so on the other users a change is mostly the format's)."""


CALL_ORDER = "ndcg@10 had the answer kept the call's order"
"""NDCG@10 of an answer that lists the best call's retrieved items in the order they came: the ranking the TRM
gave. NDCG@10 above it means the policy ordered the retrieved items better than the TRM; the share of users whose
target a call retrieved is what the calls (the preferences) decided."""


def with_call_order(rows: list[dict]) -> list[dict]:
    """Rows with ``call_retrieved`` and ``call_order_ndcg@10`` added, where ``retrieved_rank`` is known."""
    from deeprec_env.metrics import ndcg_at_k

    return [{**r, "call_retrieved": float(r["retrieved_rank"] >= 0),
             "call_order_ndcg@10": ndcg_at_k(np.array([r["retrieved_rank"]]), 10)}
            if "retrieved_rank" in r else r for r in rows]  # fmt: skip


def compare_validation(before: list[dict], after: list[dict], seed: int, weights: dict | None = None) -> dict:
    """Means before and after, and the paired per-user NDCG@10 / Recall@10 differences with 95% intervals.

    Also NDCG@10 on the users well-formed both times (:data:`WELL_FORMED`). Quantities a cached validation
    file lacks (written by an older version) are left out. The ``reward`` of both is priced with ``weights``
    (the run's) from each episode's unweighted components: a cached validation may come from a run with
    other weights. Without ``weights`` it is each row's own reward.
    """
    from agents.evaluate import interval_text, paired_difference

    before, after = with_call_order(before), with_call_order(after)
    if weights is not None:

        def priced(r: dict) -> dict:  # a row cached without its components has no reward under ``weights``
            if "components" not in r:
                return {k: v for k, v in r.items() if k != "reward"}
            return {**r, "reward": weighted_reward(weights, r["components"])}

        before, after = [priced(r) for r in before], [priced(r) for r in after]
    keys = {
        "ndcg@10": "ndcg@10",
        "recall@10": "recall@10",
        "call_order_ndcg@10": CALL_ORDER,
        "call_retrieved": "target in a call's retrieved list",
        "from_retrieved": "answer lines a call retrieved",
        "format_fail": "format_fail",
        "calls": "calls",
        "hint_calls": "calls copying the prompt's hint",
        "hint_category_calls": "calls naming one of the hint's categories",
        "hallucinated": "answer lines naming no item",
        "seen": "answer lines the history has",
        "shown": "answer lines the prompt's history shows",
        "duplicates": "answer lines repeating an item",
        "reward": "reward",
    }
    rows = [{"quantity": label, "key": k, "before": float(np.mean([r[k] for r in before])),
             "after": float(np.mean([r[k] for r in after]))}
            for k, label in keys.items() if all(k in r for r in before + after)]  # fmt: skip
    ok = {r["example"] for r in before if not r["format_fail"]} & {r["example"] for r in after if not r["format_fail"]}
    if ok:
        rows.insert(2, {"quantity": WELL_FORMED, "key": "ndcg@10", "users": ok,
                        "before": float(np.mean([r["ndcg@10"] for r in before if r["example"] in ok])),
                        "after": float(np.mean([r["ndcg@10"] for r in after if r["example"] in ok]))})  # fmt: skip
    for row in rows:
        k, users = row.pop("key"), row.pop("users", None)
        if k in ("ndcg@10", "recall@10", "call_order_ndcg@10"):
            kept = [r for r in after if users is None or r["example"] in users]
            mean, lo, hi, n = paired_difference({r["example"]: r[k] for r in kept},
                                                {r["example"]: r[k] for r in before}, seed)  # fmt: skip
            row["paired difference (95% CI)"] = f"{interval_text(mean, lo, hi)} over {n} users"
    return {"users": len(before), "rows": rows, "changed": changed_users(before, after)}


def changed_users(before: list[dict], after: list[dict]) -> dict[str, int]:
    """``{"better": n, "worse": m}``: validation users whose NDCG@10 rose / fell from ``before`` to ``after``."""
    by_user = {r["example"]: r["ndcg@10"] for r in before}
    moved = [r["ndcg@10"] - by_user[r["example"]] for r in after if r["example"] in by_user]
    return {"better": sum(d > 0 for d in moved), "worse": sum(d < 0 for d in moved)}


def weights_text(weights: dict[str, float]) -> str:
    """``format 1, hit 1, rank 1, point 0``: reward weights as the protocol prints them."""
    return ", ".join(f"{k} {v:g}" for k, v in weights.items())


def export_adapter(checkpoint: Path, dest: Path, base: GRPOArgs, readme: str, curves: Path) -> None:
    """Copy the adapter, its settings, the run's README and its curves to ``dest``.

    The adapter is its config and weights only: the base model's tokenizer serves. peft writes the config's
    ``target_modules`` in set order, which changes from process to process (string hashing): the copy lists them
    sorted, so the same run gives the same files.
    """
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(checkpoint / "adapter_model.safetensors", dest / "adapter_model.safetensors")
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copy(curves, dest / "curves.png")
    settings = {"episode": episode_settings(base), "max_new_tokens": base.max_new_tokens}
    (dest / "deeprec.json").write_text(json.dumps(settings, indent=2) + "\n")
    (dest / "README.md").write_text(readme)


def signal_text(rows: list[dict], users_per_step: int, group_size: int, weights: dict[str, float]) -> str:
    """Where stage 2's learning signal came from: groups whose rewards differed, in all and by reward component.

    Only components ``weights`` counts are listed (one of weight 0 may differ without moving anything). Empty
    for a log written before ``signal_groups`` was logged.
    """
    rows = [r for r in rows if "signal_groups_hit" in r]
    if not rows:
        return ""
    n = len(rows) * users_per_step

    def groups(key: str) -> int:
        return round(sum(r[key] for r in rows) * users_per_step)

    parts = {c: groups(f"signal_groups_{c}") for c, w in weights.items() if w and f"signal_groups_{c}" in rows[0]}
    by_part = ", ".join(f"{k} {v}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v)
    hits = round(sum(r["reward_hit"] for r in rows) * users_per_step * group_size)
    # retrieval_hit is given at the calls; logs before the episode sums had it 0 everywhere, so say nothing of those;
    # weighted, the component list above already counts it
    calls = ""
    measured = any(r.get("reward_retrieval_hit", 0) > 0 for r in rows) and "signal_groups_retrieval_hit" in rows[0]
    if measured and not weights.get("retrieval_hit"):
        k = groups("signal_groups_retrieval_hit")
        calls = (f" The samples' calls differed in retrieving the target (`retrieval_hit`, weight 0 in this run) "
                 f"inside {k} group{'s' * (k != 1)}.")  # fmt: skip
    return (
        f"Learning signal: the rewards differed inside {groups('signal_groups')} of the {n} groups (one user's "
        f"{group_size} samples each); by component: {by_part or 'none'}. {hits} of {n * group_size} sampled "
        f"episodes hit.{calls}\n\n"
    )


def summarize(out: Path, command: str, base: GRPOArgs, warm: SFTArgs, steps: dict, weights: dict, val: dict,
              timing: dict | None = None, mask_history: bool = False, target_hint: bool = False) -> str:  # fmt: skip
    """README text of a finished run folder.

    ``weights``: stage 2's reward weights; ``timing``: wall seconds and cache at start, when the run was timed;
    ``mask_history``, ``target_hint``: the env's settings of those names, said in the protocol.
    """
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    state = json.loads((out / "warmstart" / "checkpoint" / "trainer_state.json").read_text())
    cpu = base.device.split(":")[0] == "cpu"
    where = "" if cpu else f", on {base.device}"
    cols = ["step", "stage", "reward", "reward_hit", "reward_rank", "calls", "format_fail", "signal_groups",
            "signal_groups_hit", "loss", "clip_fraction", "seconds"]  # fmt: skip
    protocol = {
        "model": f"{base.model} (SmolLM2-135M-Instruct, {_DTYPE_TEXT[base.dtype]}{where}) + LoRA r={base.lora_r} "
        f"on every linear layer, chat prompt, sampling temperature {base.temperature}",
        "data": f"{base.dataset}, training episodes = the test targets of the RL user group; validation = greedy "
        f"episodes on the first {val['users']} users of a seeded order of the evaluation group's valid targets",
        "warm start": f"SFT on {state['demonstrations']} {teacher_text(warm)} transcripts (teacher NDCG@10 "
        f"{state['teacher_ndcg@10']:.3f} on them; {state['mean_tokens']:.0f} tokens each), {warm.epochs} epochs, "
        f"batch {warm.batch}, lr {warm.lr}, {state['seconds']:.0f} s",
        "stage 1": "skipped" if not steps["coldstart"] else f"coldstart, {steps['coldstart']} steps",
        "stage 2": f"rec rewards weighted {weights_text(weights)}, {steps['rec']} step{'s' * (steps['rec'] != 1)} "
        "from the warm start, "
        f"the second half of the training users whose target is in the TRM's top-{base.difficulty_top}"
        + (f", only the first {base.train_users} of them (a fixed set)" if base.train_users else ""),
        "per step": f"{base.users_per_step} user{'s' * (base.users_per_step != 1)} x {base.group_size} samples, "
        f"{base.mini_batches} optimiser steps per "
        f"rollout batch, lr {base.lr}, Adam {base.betas}, clip ({1 - base.clip_low:.2f}, {1 + base.clip_high:.2f}), "
        f"whitening '{base.whiten}', KL {base.kl_coef}"
        + (" (reference: the warm start's adapter beside the policy's)" if base.kl_reference == "adapter" else "")
        + f"; update passes of at most {base.micro_batch} trajectories"
        + (f" and {base.micro_batch_tokens} token positions" if base.micro_batch_tokens else "")
        + (", shared prompt prefix run once" if base.share_prefix else "")
        + (", gradient checkpointing" if base.gradient_checkpointing else "")
        + ("; the loss on each episode's last segment only (not the calls)" if base.train_segments == "answer" else ""),
        "episode": f"last {base.prompt_history} history items in the prompt, top-{base.retrieval_k} items per call, "
        f"at most {base.max_new_tokens} new tokens per segment"
        + (", the user's history never retrieved (mask_history)" if mask_history else "")
        + (
            ", the prompt names the target's categories (target_hint: privileged, a positive control of the trainer)"
            if target_hint
            else ""
        ),
        "seed": base.seed,
    }
    if "trm" in val:  # which TRM (another machine may train another: docs/trm.md)
        protocol["trm"] = val["trm"]
    if timing and "extra" in timing:  # the run was timed with validations of another size
        protocol["wall clock"] = (f"{timing['seconds'] / 60:.1f} min for the run with "
                                  f"{timing.get('val_users', VAL_USERS)} validation users (warm start, validations, "
                                  f"stage 2; cache at start: {timing['cache_at_start']}); this command, on the "
                                  f"finished run folder, added the {timing['extra']['val_users']}-user validations: "
                                  f"{timing['extra']['seconds'] / 60:.1f} min")  # fmt: skip
    elif timing:
        protocol["wall clock"] = (f"{timing['seconds'] / 60:.1f} min for this command (warm start, validations, "
                                  f"stage 2; cache at start: {timing['cache_at_start']})")  # fmt: skip
    vcols = ["quantity", "before", "after", "paired difference (95% CI)"]
    scols = ["agent", "ndcg@10", "recall@10", *(k for k in val["scripted"][0] if k.startswith("LLM "))]
    return (
        f"# Stage 2 on {'a CPU' if cpu else base.device} (SmolLM2-135M-Instruct + LoRA, embedded ml-100k)\n\n"
        f"Command (written by it; {'2-core CPU' if cpu else base.device}):\n\n```bash\n{command}\n```\n\n"
        f"Protocol:\n{protocol_text(protocol)}\n\n"
        f"## Validation before and after stage 2 ({val['users']} fixed users, greedy)\n\n"
        f"{markdown_table(val['rows'], vcols)}\n\n"
        f"NDCG@10 per user: {val['changed']['better']} better, {val['changed']['worse']} worse, the others "
        "unchanged.\n\n"
        "Scripted agents on the same users and episodes, and the LLM's paired per-user NDCG@10 difference to "
        f"each:\n\n{markdown_table(val['scripted'], scols)}\n\n"
        f"## Every step\n\n{signal_text(rows, base.users_per_step, base.group_size, weights)}"
        f"{markdown_table(rows, cols)}\n\n![curves](curves.png)\n"
    )


def unset(sizes: dict, settings, defaults) -> dict:
    """The entries of ``sizes`` whose field ``settings`` holds at its value in ``defaults`` (no flag set it)."""
    return {k: v for k, v in sizes.items() if getattr(settings, k) == getattr(defaults, k)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/curriculum_cpu)")
    ap.add_argument("--run", default=None, help="run folder (default runs/curriculum-cpu)")
    ap.add_argument("--export", default=None, help="copy the final adapter here (the full run: agents/adapters/...)")
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic model and data, seconds")
    ap.add_argument("--model", default=None, help="policy to start from (default: smollm2)")
    ap.add_argument("--encoder", default=None, help="text encoder of the env (default: the embedded MiniLM)")
    ap.add_argument(
        "--device",
        type=device_option,
        default=CPU_ARGS.device,
        help=f"torch device of the policy: warm start, stage 2 and validation (default {CPU_ARGS.device})",
    )
    ap.add_argument("--dtype", choices=DTYPES, default=CPU_ARGS.dtype,
                    help=f"the policy's dtype (default {CPU_ARGS.dtype})")  # fmt: skip
    ap.add_argument(
        "--format-weight",
        type=float,
        default=STAGES["rec"]["format"],
        help="weight of stage 2's format reward (default: the reference's 1); at least --wasted-weight",
    )
    ap.add_argument(
        "--point-weight",
        type=float,
        default=STAGES["rec"]["point"],
        help="weight of stage 2's point reward (default: the reference's 1; 0 leaves format, hit, rank)",
    )
    ap.add_argument(
        "--retrieval-hit-weight",
        type=float,
        default=0.0,
        help="weight of the process reward retrieval_hit in stage 2, given at the call whose list first holds the "
        "target (default 0: the reference's stage 2 has none; docs/design.md)",
    )
    ap.add_argument(
        "--wasted-weight",
        type=float,
        default=0.0,
        help="weight of the outcome reward wasted in stage 2, minus the share of answer lines that name no item, a "
        "repeat or a history item (default 0: the reference's stage 2 has none; docs/design.md)",
    )
    ap.add_argument(
        "--difficulty-top",
        type=int,
        default=CPU_ARGS.difficulty_top,
        help="stage 2 trains on users whose target is in the TRM's top-N without a preference "
        f"(default {CPU_ARGS.difficulty_top})",
    )
    ap.add_argument("--lr", type=float, default=CPU_ARGS.lr, help=f"stage 2's learning rate (default {CPU_ARGS.lr})")
    ap.add_argument("--temperature", type=float, default=CPU_ARGS.temperature,
                    help=f"stage 2's sampling temperature, the loss's too (default {CPU_ARGS.temperature}; the "
                    "paper's 1.0)")  # fmt: skip
    ap.add_argument(
        "--kl-coef",
        type=float,
        default=CPU_ARGS.kl_coef,
        help=f"stage 2's KL penalty to the warm start (default {CPU_ARGS.kl_coef}: the reference has none)",
    )
    choices = {  # stage 2's settings with a fixed set of values: GRPOArgs' own (its Literal types)
        "kl_reference": "where the KL's warm start lives: a second copy of the model, or its adapter beside the "
        "policy's on the same base weights (docs/training.md)",
        "train_segments": "which generated tokens stage 2's loss covers: all, or each episode's last segment, after "
        "its last call (an ablation)",
    }
    hints = typing.get_type_hints(GRPOArgs)
    for field, text in choices.items():
        default = getattr(CPU_ARGS, field)
        ap.add_argument("--" + field.replace("_", "-"), choices=typing.get_args(hints[field]), default=default,
                        help=f"{text} (default {default})")  # fmt: skip
    ap.add_argument("--steps", type=int, default=STEPS["rec"], help=f"stage 2's steps (default {STEPS['rec']})")
    sizes = {
        "prompt_history": "history items the prompt shows (warm start, stage 2 and validation alike)",
        "retrieval_k": "items each call retrieves (warm start, stage 2 and validation alike)",
        "users_per_step": "users per stage-2 step",
        "group_size": "sampled episodes per user in a stage-2 step (the group its advantages compare)",
        "rollout_batch": "episodes sampled in lock step",
        "micro_batch": "trajectories per forward/backward pass of the update",
        "micro_batch_tokens": "at most this many padded token positions per pass (0: no bound; docs/training.md)",
        "train_users": "stage 2 trains on only the first N of its users, a fixed set (0: all of them)",
    }
    for field, text in sizes.items():
        default = getattr(CPU_ARGS, field)
        ap.add_argument("--" + field.replace("_", "-"), type=int, default=default, help=f"{text} (default {default})")
    ap.add_argument(
        "--share-prefix",
        action="store_true",
        help="the update runs a pass's shared prompt prefix once (docs/training.md)",
    )
    ap.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward passes (warm start and stage 2): far less memory per pass, more "
        "compute; not with --share-prefix (docs/training.md)",
    )
    ap.add_argument(
        "--mask-history",
        action="store_true",
        help="the TRM never returns the user's history items (warm start, stage 2 and validation alike)",
    )
    ap.add_argument(
        "--warmstart-teacher",
        choices=TEACHERS,
        default=CPU_WARM.teacher,
        help=f"scripted agent whose transcripts the warm start learns (default {CPU_WARM.teacher}; history-facet "
        "draws its number of calls per transcript)",
    )
    ap.add_argument(
        "--target-hint",
        action="store_true",
        help="the prompt names the target's categories (warm start, stage 2 and validation alike): privileged, a "
        "positive control of the trainer, with --warmstart-teacher hint-mix (docs/training.md)",
    )
    ap.add_argument(
        "--warmstart-hint-share",
        type=float,
        default=CPU_WARM.teacher_hint_share,
        help=f"share of hint-mix transcripts whose call copies the hint (default {CPU_WARM.teacher_hint_share})",
    )
    ap.add_argument(
        "--warmstart-unseen-share",
        type=float,
        default=CPU_WARM.teacher_unseen_share,
        help="share of unseen-mix transcripts whose answer skips the prompt's history titles "
        f"(default {CPU_WARM.teacher_unseen_share})",
    )
    ap.add_argument(
        "--warmstart-episodes",
        type=int,
        default=CPU_WARM.episodes,
        help=f"teacher transcripts the warm start learns from (default {CPU_WARM.episodes})",
    )
    ap.add_argument(
        "--warmstart-epochs",
        type=int,
        default=CPU_WARM.epochs,
        help=f"passes of the warm start over them (default {CPU_WARM.epochs})",
    )
    ap.add_argument(
        "--val-users",
        type=int,
        default=VAL_USERS,
        help=f"fixed validation users, the first N of the same order (default {VAL_USERS}; ml-100k has 471)",
    )
    args = ap.parse_args(argv)
    if args.val_users < 1:
        ap.error(f"--val-users {args.val_users}; must be >= 1")
    for flag in ("format_weight", "point_weight", "retrieval_hit_weight", "wasted_weight", "kl_coef"):
        if not getattr(args, flag) >= 0:  # nan fails too
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}; must be >= 0")
    if args.wasted_weight > args.format_weight:
        # a malformed answer scores format -1 and every outcome 0 (wasted too): it would outscore a well-formed
        # answer whose lines are all wasted (-wasted_weight), and the policy would learn to break the format
        ap.error(f"--wasted-weight {args.wasted_weight} > --format-weight {args.format_weight}: a malformed answer "
                 "would score more than a well-formed one naming only history items, repeats or no item; "
                 "raise --format-weight to at least --wasted-weight")  # fmt: skip
    if (args.warmstart_teacher == HintMixPolicy.name) != args.target_hint:
        ap.error("--warmstart-teacher hint-mix and --target-hint go together: the teacher reads the hint, and a "
                 "hint no teacher shows is a different experiment")  # fmt: skip
    if args.difficulty_top < 1:
        ap.error(f"--difficulty-top {args.difficulty_top}; must be >= 1")
    if not args.lr > 0:
        ap.error(f"--lr {args.lr}; must be > 0")
    nonnegative = ("micro_batch_tokens", "train_users")
    positive = ("steps", "warmstart_episodes", "warmstart_epochs", *(f for f in sizes if f not in nonnegative))
    for flag in positive:
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}; must be >= 1")
    for flag, zero in (("micro_batch_tokens", "no bound"), ("train_users", "all")):
        if getattr(args, flag) < 0:
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}; must be >= 0 (0: {zero})")
    try:  # the settings classes refuse what the flags above cannot (gradient checkpointing with share_prefix)
        base = replace(CPU_ARGS, **{f: getattr(args, f) for f in (*sizes, *choices)},
                       difficulty_top=args.difficulty_top, lr=args.lr, temperature=args.temperature,
                       kl_coef=args.kl_coef, share_prefix=args.share_prefix, device=args.device, dtype=args.dtype,
                       gradient_checkpointing=args.gradient_checkpointing)  # fmt: skip
        warm = replace(CPU_WARM, teacher=args.warmstart_teacher, episodes=args.warmstart_episodes,
                       epochs=args.warmstart_epochs, teacher_hint_share=args.warmstart_hint_share,
                       teacher_unseen_share=args.warmstart_unseen_share,
                       gradient_checkpointing=args.gradient_checkpointing)  # fmt: skip
    except ValueError as e:
        ap.error(str(e))
    steps = {**STEPS, "rec": args.steps}
    n_val = args.val_users
    weights = {**STAGES["rec"], "format": args.format_weight, "point": args.point_weight}
    if args.retrieval_hit_weight:
        weights["retrieval_hit"] = args.retrieval_hit_weight
    if args.wasted_weight:
        weights["wasted"] = args.wasted_weight
    env_kwargs: dict = {"reward_weights": weights, "mask_history": args.mask_history}
    if args.target_hint:
        env_kwargs["target_hint"] = True
    # only the default run makes the bundled adapter
    default_run = (not args.smoke and weights == STAGES["rec"] and base == CPU_ARGS and steps == STEPS
                   and warm == CPU_WARM and not args.mask_history and not args.target_hint)  # fmt: skip
    export = Path(args.export) if args.export else (BUNDLED_ADAPTER if default_run else None)
    if args.model:
        base = replace(base, model=args.model)
    if args.run:
        base = replace(base, out=args.run)
    if args.smoke:
        from deeprec_env.trm import TRMConfig

        # smoke sizes, where the flags left the CPU run's
        small = unset({"users_per_step": 1, "group_size": 2, "rollout_batch": 2}, base, CPU_ARGS)
        base = replace(base, **small, max_new_tokens=8, lora_r=2, dataset="synthetic")
        warm = replace(warm, **unset({"episodes": 2, "epochs": 1}, warm, CPU_WARM), batch=2, lora_r=2)
        steps = {"coldstart": 0, "rec": 1 if steps == STEPS else steps["rec"]}
        n_val = 3 if n_val == VAL_USERS else n_val
        env_kwargs["trm"] = TRMConfig(d_model=16, ffn_dim=32, max_len=12, max_epochs=2, batch_size=32)
    if args.encoder:
        env_kwargs["encoder"] = args.encoder
    command = shlex.join(["python", "-m", "benchmarks.curriculum_cpu", *(sys.argv[1:] if argv is None else argv)])
    run = Path(base.out)
    t0, cache_at_start = time.perf_counter(), cache_contents()
    resumed = (run / "log.jsonl").exists() or (run / "warmstart").exists()
    warm = replace(warm, **episode_settings(base), model=base.model, device=base.device, dtype=base.dtype,
                   out=str(run / "warmstart"))  # fmt: skip
    with run_folder_errors():  # a reused --run folder with other settings: one line, not a traceback
        warm_ckpt = train_sft(warm, env_kwargs, progress=not args.smoke)
        before = validation(warm_ckpt, base, env_kwargs, n_val, validation_file(run, "before", n_val))
        final = run_curriculum(replace(base, model=str(warm_ckpt)), steps["coldstart"], steps["rec"], env_kwargs,
                               progress=not args.smoke)  # fmt: skip
    # cached per checkpoint: a run continued with a larger --steps validates its new one
    done = run_state(run / "rec")[0]
    after = validation(final, base, env_kwargs, n_val, validation_file(run, "after", n_val, done))
    val = compare_validation(before, after, base.seed, weights)
    names = ("trm-only", "history-top-category", warm.teacher)
    if warm.teacher == HintMixPolicy.name:  # what the hint is worth: its categories as the one call's preference
        names = ("trm-only", "history-top-category", "history-top-category-unseen", "oracle-preference")
    elif warm.teacher == UnseenMixPolicy.name:  # the two teachers it blends
        names = ("trm-only", "history-top-category", "history-top-category-unseen")
    val["scripted"] = scripted_validation(base, env_kwargs, n_val, names, {"before": before, "after": after}, base.seed)
    val["trm"] = trm_line(get_resources(EnvConfig(**base.env_kwargs("rec", env_kwargs))).retriever)
    dest = Path(args.out) if args.out else RESULTS / ("curriculum_cpu" + ("_smoke" if args.smoke else ""))
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "log.jsonl", dest / "log.jsonl")
    shutil.copy(run / "warmstart" / "log.jsonl", dest / "warmstart.jsonl")
    shutil.copy(run / "curves.png", dest / "curves.png")
    (dest / "validation.json").write_text(json.dumps({**val, "before": before, "after": after}, indent=2) + "\n")
    # a resumed run's time is not the command's: the time of the one invocation that ran it all (re-running a
    # finished run only rewrites the results), else none rather than a wrong figure
    timing = json.loads((run / "timing.json").read_text()) if (run / "timing.json").is_file() else None
    if not resumed:
        timing = {"seconds": time.perf_counter() - t0, "cache_at_start": cache_at_start, "val_users": n_val}
        (run / "timing.json").write_text(json.dumps(timing) + "\n")
    elif timing is not None and timing.get("val_users", VAL_USERS) != n_val:
        # validations of another size on a finished run: their time is this invocation's, kept for re-runs
        extra = run / f"timing_val{n_val}.json"
        if not extra.is_file():
            extra.write_text(json.dumps({"seconds": time.perf_counter() - t0, "val_users": n_val}) + "\n")
        timing = {**timing, "extra": json.loads(extra.read_text())}
    readme = summarize(run, command, base, warm, steps, weights, val, timing, args.mask_history, args.target_hint)
    (dest / "README.md").write_text(readme)
    settings = {"stage": asdict(base), "warm_start": asdict(warm), "reward_weights": weights,
                "mask_history": args.mask_history, "target_hint": args.target_hint,
                "steps": steps, "val_users": n_val, "timing": timing}  # fmt: skip
    (dest / "settings.json").write_text(json.dumps(settings, indent=2))
    if export is not None:
        export_adapter(final, export, base, readme, run / "curves.png")
    print(readme)


if __name__ == "__main__":
    main()
