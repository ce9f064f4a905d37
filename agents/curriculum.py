"""The two-stage curriculum: ``coldstart`` (learn to call the TRM) then ``rec`` (learn to recommend).

    python -m agents.curriculum --coldstart-steps 20 --rec-steps 80 --users-per-step 2 --group-size 4

``--warm-start history-facet`` first fine-tunes ``--model`` on scripted-agent transcripts (agents.sft):
needed for models too small to ever call the tool by themselves (SmolLM2-135M); the paper has no such step.
With ``--lora-r`` the warm start trains the LoRA adapter the stages continue. ``--coldstart-steps 0`` skips
stage 1 (stage 2 starts from the warm start).
Stage 1 starts from ``--model`` (or the warm start) and draws from the first half of the filtered
training users; stage 2 starts from stage 1's checkpoint and draws from the second half. Each stage writes
``<out>/<stage>/log.jsonl``, ``curves.png`` and ``checkpoint/`` (model, tokenizer, optimizer state);
re-running the same command after a kill resumes where it stopped. For the paper's scale see
``agents.grpo.PAPER_SCALE`` and run the same command under ``accelerate launch`` on GPUs.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from agents.grpo import GRPOArgs, train
from agents.rollout import episode_settings
from agents.runs import plot_curves, read_log, run_folder_errors, write_log
from agents.sft import SFTArgs, train_sft


def run_curriculum(base: GRPOArgs, coldstart_steps: int, rec_steps: int, env_kwargs: dict | None = None,
                   *, warm_start: SFTArgs | None = None, progress: bool = True) -> Path:  # fmt: skip
    """Train stage 1 then stage 2; returns the final checkpoint folder.

    ``warm_start`` first fine-tunes ``base.model`` on scripted transcripts into ``<out>/warmstart``.
    ``coldstart_steps=0`` skips stage 1: stage 2 starts from the warm start (or ``base.model``).
    """
    if coldstart_steps < 0 or rec_steps < 1:
        raise ValueError(f"coldstart_steps={coldstart_steps}, rec_steps={rec_steps}; need >= 0 and >= 1")
    out = Path(base.out)
    if warm_start is not None:
        ws = replace(
            warm_start,
            **episode_settings(base),
            model=base.model,
            device=base.device,
            dtype=base.dtype,
            out=str(out / "warmstart"),
        )
        base = replace(base, model=str(train_sft(ws, env_kwargs, progress=progress)))
    stages = ("coldstart", "rec") if coldstart_steps else ("rec",)
    if coldstart_steps:
        stage1 = replace(base, stage="coldstart", steps=coldstart_steps, users="first-half", out=str(out / "coldstart"))
        base = replace(base, model=str(train(stage1, env_kwargs, progress=progress)))
    stage2 = replace(base, stage="rec", steps=rec_steps, users="second-half", out=str(out / "rec"))
    ckpt2 = train(stage2, env_kwargs, progress=progress)
    rows = [r for stage in stages for r in read_log(out / stage / "log.jsonl")]
    for i, r in enumerate(rows):
        r["step"] = i  # one x axis across both stages
    write_log(out / "log.jsonl", rows)
    plot_curves(out / "log.jsonl", out / "curves.png")
    return ckpt2


def main(argv=None) -> None:
    """CLI: every :class:`~agents.grpo.GRPOArgs` field plus the two stage lengths."""
    from deeprec_env.cli import add_dataclass_args, from_args, int_at_least, positive_int

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--coldstart-steps", type=int_at_least(0), default=10, help="stage 1's steps (0: skip it)")
    ap.add_argument("--rec-steps", type=positive_int, default=10, help="stage 2's steps")
    ap.add_argument("--warm-start", default="none",
                    help="'none' (the paper: RL from the base model) or a scripted teacher for a short SFT "
                         "first (e.g. history-facet; see agents.sft)")  # fmt: skip
    ap.add_argument("--warm-start-episodes", type=int, default=SFTArgs.episodes)
    ap.add_argument("--warm-start-epochs", type=int, default=SFTArgs.epochs)
    ap.add_argument("--warm-start-lr", type=float, default=SFTArgs.lr)
    ap.add_argument("--warm-start-calls", default=",".join(map(str, SFTArgs.teacher_calls)),
                    help="calls per demonstration, drawn per episode from this list (e.g. '1,2')")  # fmt: skip
    add_dataclass_args(ap, GRPOArgs, skip=("stage", "steps", "users"))
    ns = ap.parse_args(argv)
    base = from_args(GRPOArgs, ns, defaults_for=("stage", "steps", "users"), parser=ap)
    if base.out == GRPOArgs.out:
        base = replace(base, out="runs/curriculum")
    warm = None
    if ns.warm_start != "none":
        try:
            calls = tuple(int(c) for c in ns.warm_start_calls.split(","))
        except ValueError:
            ap.error(f"--warm-start-calls {ns.warm_start_calls!r}: expected integers separated by commas, e.g. 1,2")
        try:
            warm = SFTArgs(teacher=ns.warm_start, teacher_calls=calls, episodes=ns.warm_start_episodes,
                           epochs=ns.warm_start_epochs, lr=ns.warm_start_lr, seed=base.seed,
                           lora_r=base.lora_r, gradient_checkpointing=base.gradient_checkpointing)  # fmt: skip
        except ValueError as e:
            ap.error(f"warm start: {e}")
    with run_folder_errors():  # a reused folder with other settings: one line, not a traceback
        ckpt = run_curriculum(base, ns.coldstart_steps, ns.rec_steps, warm_start=warm)
    print(f"final checkpoint: {ckpt}; logs and curves under {base.out}")


if __name__ == "__main__":
    main()
