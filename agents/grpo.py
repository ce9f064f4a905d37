"""REINFORCE++ with a group baseline (``docs/training.md``), on DeepRec-v0.

Per step: draw ``users_per_step`` training users; sample ``group_size`` episodes for each (same user,
same reset options); the reward is the environment's total for the stage, given once per trajectory;
advantage = reward - group mean, then global whitening; every policy token of a trajectory gets its
advantage; PPO-style clipped loss with the asymmetric clip (1 - 0.2, 1 + 0.28), no critic, optional
KL to a frozen reference model (coefficient 0 by default), tokens the environment inserted masked out;
gradient clipping and Adam (0.9, 0.95).

Reads top to bottom: :class:`GRPOArgs`, :func:`compute_advantages`, :func:`policy_loss`,
:func:`train_step` (the update), then :func:`train` (rollouts -> advantages -> update -> log and checkpoint)
and the helpers it calls in that order. Checkpoints, logs, validation and curves live in
:mod:`agents.runs` (shared with the warm start). ``python -m agents.grpo --help`` runs one stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from agents.llm import adapter_base, check_checkpointing, check_optimiser, reference_model
from agents.rollout import (
    EpisodeSettings,
    Rollout,
    collect_rollouts,
    group_rewards,
    last_segment_only,
    pad_batch,
    token_logprobs,
)
from agents.runs import (
    RunFolderError,
    _deepspeed,
    memory_gib,
    plot_curves,
    recover_checkpoint,
    run_folder_errors,
    run_state,
    save_checkpoint,
    validate,
    write_log,
)
from deeprec_env.config import Device, Dtype, check_fields, torch_device


@dataclass(frozen=True)
class GRPOArgs(EpisodeSettings):
    """Every setting of one RL stage. Defaults run on a laptop CPU; see ``PAPER_SCALE`` for the paper's.

    The episode fields (dataset, prompt, history shown, items per call) come from
    :class:`~agents.rollout.EpisodeSettings`.
    """

    model: str = "smollm2"
    """Policy to start from: 'smollm2' (embedded), a hub id, a local path or a checkpoint folder."""
    stage: Literal["coldstart", "rec"] = "coldstart"
    """Reward stage."""
    steps: int = 10
    """Optimiser steps."""
    users_per_step: int = 2
    """Prompts (users) per step."""
    group_size: int = 4
    """Samples per user (G)."""
    lr: float = 1e-5
    """Adam learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    clip_low: float = 0.2
    """Lower ratio clip: ratios below 1 - clip_low are clipped."""
    clip_high: float = 0.28
    """Upper ratio clip: ratios above 1 + clip_high are clipped."""
    kl_coef: float = 0.0
    """KL penalty to the starting model (0: no reference model is kept)."""
    kl_reference: Literal["copy", "adapter"] = "copy"
    """Where the KL penalty's starting model lives: 'copy', a second frozen copy of it; 'adapter', for a LoRA
    policy only, its own base weights with the starting adapter beside the trained one
    (:class:`agents.llm.AdapterReference`): no second copy of the base model, the same log-probs up to float
    rounding. 'copy' by default: rounding differences change later samples, and the committed runs used it."""
    train_segments: Literal["all", "answer"] = "all"
    """Which generated tokens the loss (and the KL) covers: 'all' (the reference), or 'answer', each episode's last
    segment only (the reasoning and answer after its last call; :func:`agents.rollout.last_segment_only`). An
    ablation: the calls' tokens leave the update, though they share the weights it changes."""
    whiten: Literal["divide", "multiply", "none"] = "divide"
    """Global whitening of advantages: divide by the std (correct), multiply (the reference's bug), none."""
    temperature: float = 1.0
    """Sampling temperature of rollouts; the loss's log-probs use the same (on-policy)."""
    top_p: float = 1.0
    """Nucleus threshold of rollouts (1: off); the loss applies the same truncation."""
    top_k: int = 0
    """Top-k of rollouts (0: off; transformers alone would apply 50); the loss applies the same truncation."""
    mini_batches: int = 1
    """Optimiser steps per rollout batch: the step's trajectories are split into this many mini-batches (the
    reference: 2, a train batch of 512 out of 1,024). With more than one update per batch the ratio moves
    away from 1 and the asymmetric clip acts."""
    ppo_epochs: int = 1
    """Passes over the rollout batch (each of ``mini_batches`` optimiser steps)."""
    max_new_tokens: int = 192
    """Tokens per generated segment."""
    micro_batch: int = 2
    """Trajectories per forward/backward pass (gradient accumulation over the step)."""
    micro_batch_tokens: int = 0
    """At most this many token positions (rows x the longest row) in one forward/backward pass of the update: a
    micro-batch above it is cut into smaller ones, down to one trajectory (0: no bound). Bounds the update's memory
    when some episodes are long (many calls); the gradient is the same sum, only its float rounding changes. Not
    with DeepSpeed, whose accumulation count is fixed."""
    share_prefix: bool = False
    """The loss's forward runs the prompt prefix a micro-batch's rows share (the instructions) once, not once per
    row (``agents.rollout.token_logprobs``): the same loss and gradients up to float rounding, fewer tokens through
    the model. Off by default: rounding differences change later samples, and the committed runs predate it."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the update's backward pass instead of keeping them (transformers'
    gradient checkpointing): far less memory per pass (``benchmarks/update_memory.py``), one more forward of
    compute, the same gradients up to float rounding. Not with ``share_prefix``."""
    rollout_batch: int = 8
    """Episodes generated in lock step."""
    difficulty_top: int = 100
    """Drop training users whose target is outside the TRM's top-N (no preference)."""
    users: str = "first-half"
    """Which filtered training users this stage draws from: 'first-half', 'second-half' or 'all'."""
    train_users: int = 0
    """Train on only the first N of those users (0: all of them): a fixed small set, e.g. to check that a
    recipe raises the reward on the very users it trains on before asking it to generalise."""
    val_users: int = 16
    """Fixed validation subset evaluated (greedy) every ``eval_every`` steps (0 disables)."""
    eval_every: int = 5
    """Steps between validation evaluations."""
    lora_r: int = 0
    """LoRA rank through peft (0: full fine-tuning)."""
    rollout_engine: Literal["transformers", "vllm"] = "transformers"
    """Who generates rollouts: transformers' ``generate`` on the training model, or a colocated vLLM
    engine that gets the weights after every step (needs vLLM; see :mod:`agents.vllm_engine`)."""
    vllm_gpu_memory: float = 0.3
    """Share of the accelerator's memory the vLLM engine may take (the trainer needs the rest)."""
    device: Device = "cpu"
    """Torch device (use accelerate launch for several GPUs)."""
    dtype: Dtype = "float32"
    """Model dtype."""
    seed: int = 0
    """Seed of user draws and sampling (a step's randomness depends only on (seed, step))."""
    out: str = "runs/grpo"
    """Run folder: log.jsonl, curves.png, checkpoint/."""

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("steps", "users_per_step", "group_size", "micro_batch", "rollout_batch", "max_new_tokens",
                     "mini_batches", "ppo_epochs"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; must be >= 1")
        if self.kl_coef > 0 and self.kl_reference == "adapter" and not self.lora_r and adapter_base(self.model) is None:
            raise ValueError(f"kl_reference='adapter' needs a LoRA policy: lora_r > 0 or a LoRA adapter folder as "
                             f"model (got lora_r=0, model={self.model!r})")  # fmt: skip
        if self.train_users < 0:
            raise ValueError(f"train_users={self.train_users}; must be >= 0 (0: every training user)")
        if self.val_users < 0 or self.eval_every < 1 or self.difficulty_top < 1:
            raise ValueError(f"val_users={self.val_users}, eval_every={self.eval_every}, difficulty_top="
                             f"{self.difficulty_top}; need val_users >= 0 (0: none), eval_every >= 1, "
                             "difficulty_top >= 1")  # fmt: skip
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef={self.kl_coef}; must be >= 0 (0: no KL penalty)")
        if self.micro_batch_tokens < 0:
            raise ValueError(f"micro_batch_tokens={self.micro_batch_tokens}; must be >= 0 (0: no bound)")
        if self.whiten not in ("divide", "multiply", "none"):
            raise ValueError(f"whiten={self.whiten!r}; must be 'divide', 'multiply' or 'none'")
        if self.users not in ("first-half", "second-half", "all"):
            raise ValueError(f"users={self.users!r}; must be 'first-half', 'second-half' or 'all'")
        if self.rollout_engine not in ("transformers", "vllm"):
            raise ValueError(f"rollout_engine={self.rollout_engine!r}; must be 'transformers' or 'vllm'")
        if not 0 < self.vllm_gpu_memory <= 1:
            raise ValueError(f"vllm_gpu_memory={self.vllm_gpu_memory}; must be in (0, 1]")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(
                f"temperature={self.temperature}, top_p={self.top_p}, top_k={self.top_k}; RL samples: need "
                "temperature > 0, 0 < top_p <= 1, top_k >= 0"
            )
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"clip_low={self.clip_low}, clip_high={self.clip_high}; need 0 <= low < 1, high >= 0")
        check_optimiser(self)
        check_checkpointing(self)


RESUME_FREE = frozenset({"steps", "val_users", "eval_every", "micro_batch", "micro_batch_tokens", "share_prefix",
                         "gradient_checkpointing", "vllm_gpu_memory", "out"})  # fmt: skip
"""The :class:`GRPOArgs` fields a run may change when it resumes: its length, its validation and how an
update is cut into passes (the same gradient up to float rounding); any other change is a
:class:`~agents.runs.RunFolderError` (a ``ValueError``)."""


PAPER_SCALE = {
    "coldstart": dict(model="Qwen/Qwen2.5-7B", stage="coldstart", steps=20, users_per_step=128, group_size=8,
                      lr=1e-6, dtype="bfloat16", device="cuda", prompt="base", dataset="ml-1m", mini_batches=2),
    "rec": dict(model="<stage-1 checkpoint>", stage="rec", steps=80, users_per_step=128, group_size=8,
                lr=1e-6, dtype="bfloat16", device="cuda", prompt="base", dataset="ml-1m", mini_batches=2),
}  # fmt: skip
"""The paper's settings per stage (Qwen2.5-7B base, 128 users x 8 samples, lr 1e-6, bf16, 20 + 80 steps, two
optimiser steps per rollout batch)."""


def compute_advantages(rewards: np.ndarray, whiten: str = "divide", eps: float = 1e-8) -> np.ndarray:
    """Group baseline then global whitening: ``a = r - mean_group(r)``; ``(a - mean(a)) / std(a)``.

    ``whiten="multiply"`` reproduces the reference code's ``(a - mean) * std``; ``"none"`` skips it.

    >>> compute_advantages(np.array([[1.0, 3.0], [0.0, 0.0]]), whiten="none").tolist()
    [[-1.0, 1.0], [0.0, 0.0]]
    """
    r = np.asarray(rewards, dtype=np.float64)
    a = r - r.mean(axis=1, keepdims=True)
    if whiten == "none":
        return a
    mu, sd = a.mean(), a.std()
    return (a - mu) / (sd + eps) if whiten == "divide" else (a - mu) * sd


def _on_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` where ``mask`` is set, 0 elsewhere.

    Off the policy tokens a log-prob difference is not computed (0) or ``-inf - -inf`` (a prompt token outside
    top-k), and a NaN there would survive a multiplication by the mask.
    """
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
) -> torch.Tensor:
    """PPO clipped surrogate, averaged over policy tokens: ``-min(rA, clip(r, 1-low, 1+high) A)``.

    Args:
        logp: ``(B, L)`` log-probs under the current policy.
        old_logp: ``(B, L)`` log-probs under the policy that sampled the tokens.
        advantages: ``(B,)`` one advantage per trajectory (every token gets it).
        mask: ``(B, L)`` 1 for policy tokens, 0 for the prompt, inserted item lists and padding.
        clip_low: lower clip.
        clip_high: upper clip.
    """
    ratio = torch.exp(_on_mask(logp - old_logp, mask))
    adv = advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    return -(surrogate * mask).sum() / mask.sum().clamp(min=1)


def train_step(model, optimizer, rollouts: list[Rollout], advantages: np.ndarray, args: GRPOArgs, pad_id: int,
               ref_model=None, accelerator=None, rng: np.random.Generator | None = None) -> dict:  # fmt: skip
    """The policy update of one step; returns statistics.

    ``ppo_epochs`` passes over the rollouts, each of ``mini_batches`` optimiser steps (micro-batched).
    Log-probs are those of the sampling distribution (temperature, top-k, top-p as in the rollouts). With
    one update per batch (the default) the old log-probs are the current ones, detached: ratio 1 and the
    gradient is the policy gradient. With more, they are computed once before the first update, by the
    model that sampled the rollouts, and the clip acts as the ratio moves. ``rng`` shuffles the
    trajectories between mini-batches. With ``accelerator`` (several processes), gradients are synchronised
    once per optimiser step, on its last micro-batch. ``ref_model`` (a frozen model or an
    :class:`agents.llm.AdapterReference`) gives the KL penalty's reference log-probs when ``kl_coef`` > 0.
    With ``train_segments="answer"`` only each episode's last segment is trained (and counted in ``policy_tokens``).
    """
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                "share_prefix": args.share_prefix}  # fmt: skip
    if args.train_segments == "answer":
        rollouts = [replace(r, trajectory=last_segment_only(r.trajectory)) for r in rollouts]
    reuse = args.ppo_epochs * args.mini_batches > 1
    old = _old_logprobs(model, rollouts, args, pad_id, sampling) if reuse else None
    stats = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "grad_norm": 0.0, "sampler_gap": 0.0, "tokens": 0}
    n_updates = 0
    for _ in range(args.ppo_epochs):
        order = np.arange(len(rollouts)) if rng is None or not reuse else rng.permutation(len(rollouts))
        for part in np.array_split(order, args.mini_batches):
            if len(part):
                grad_norm = _optimiser_step(model, optimizer, rollouts, advantages, [int(i) for i in part], old,
                                            args, pad_id, sampling, stats, ref_model, accelerator)  # fmt: skip
                stats["grad_norm"] += grad_norm
                n_updates += 1
    n_tokens = max(stats["tokens"], 1)
    return {
        "loss": stats["loss"] / max(n_updates, 1),
        "grad_norm": stats["grad_norm"] / max(n_updates, 1),
        "kl": stats["kl"] / max(n_updates, 1),
        "clip_fraction": stats["clipped"] / n_tokens,
        "sampler_gap": stats["sampler_gap"] / n_tokens,
        "updates": n_updates,
        "policy_tokens": int(sum(sum(r.trajectory.policy_mask) for r in rollouts)),
    }


def micro_batches(lengths: list[int], size: int, max_tokens: int = 0) -> list[list[int]]:
    """Positions ``0..n-1``, in order, cut into the update's forward/backward passes.

    At most ``size`` rows per pass, and a padded size (rows x the longest of their ``lengths``) of at most
    ``max_tokens`` (0: no bound); a row longer than the bound runs alone.
    """
    out: list[list[int]] = []
    for i, n in enumerate(lengths):
        if out and len(out[-1]) < size:
            widest = max(n, *(lengths[j] for j in out[-1]))
            if not max_tokens or (len(out[-1]) + 1) * widest <= max_tokens:
                out[-1].append(i)
                continue
        out.append([i])
    return out


def _micro_parts(rollouts: list[Rollout], idx: list[int], args: GRPOArgs) -> list[list[int]]:
    """The trajectories ``idx`` as the update's forward/backward passes (:func:`micro_batches`)."""
    lengths = [len(rollouts[i].trajectory.ids) for i in idx]
    return [[idx[j] for j in g] for g in micro_batches(lengths, args.micro_batch, args.micro_batch_tokens)]


@torch.no_grad()
def _old_logprobs(model, rollouts: list[Rollout], args: GRPOArgs, pad_id: int, sampling: dict) -> list[torch.Tensor]:
    """Per trajectory, the log-probs of its tokens under the current (sampling) policy, before any update."""
    device = next(model.parameters()).device
    out = []
    for part in _micro_parts(rollouts, list(range(len(rollouts))), args):
        chunk = [rollouts[i] for i in part]
        batch = {k: v.to(device) for k, v in pad_batch([r.trajectory for r in chunk], pad_id).items()}
        lp = token_logprobs(model, batch["input_ids"], batch["attention_mask"], needed=batch["loss_mask"], **sampling)
        out.extend(lp[j, : len(r.trajectory.ids)].detach() for j, r in enumerate(chunk))
    return out


def _optimiser_step(model, optimizer, rollouts, advantages, idx: list[int], old, args: GRPOArgs, pad_id: int,
                    sampling: dict, stats: dict, ref_model, accelerator) -> float:  # fmt: skip
    """One optimiser step on the trajectories ``idx`` (micro-batched, token mean over them); its grad norm."""
    import contextlib

    device = next(model.parameters()).device
    model.train()
    optimizer.zero_grad(set_to_none=True)
    chosen = [rollouts[i] for i in idx]
    n_tokens = sum(sum(r.trajectory.policy_mask) for r in chosen)
    # with share_prefix, a user's samples (adjacent in ``rollouts``) go to the same passes, where they share their
    # whole prompt; the sum of the passes' gradients is the same in any order
    parts = _micro_parts(rollouts, sorted(idx) if args.share_prefix else idx, args)
    # DeepSpeed accumulates over its configured number of micro-batches (``train`` sets it to this
    # optimiser step's) and divides each loss by it; scale back so the gradient is the same as elsewhere.
    ds_scale = 1.0
    deepspeed = _deepspeed(accelerator)
    if deepspeed:
        gas = accelerator.state.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"]
        if gas != len(parts):
            raise RuntimeError(f"{len(parts)} micro-batches this optimiser step, DeepSpeed accumulates {gas}")
        ds_scale = float(gas)
    for n, part in enumerate(parts):
        trajs = [rollouts[i].trajectory for i in part]
        batch = {k: v.to(device) for k, v in pad_batch(trajs, pad_id).items()}
        sync = accelerator is None or n == len(parts) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            mask = batch["loss_mask"]
            ref = None
            if ref_model is not None and args.kl_coef > 0:  # before the policy's pass: a shared adapter is switched
                with torch.no_grad(), reference_model(ref_model) as reference:
                    ref = token_logprobs(reference, batch["input_ids"], batch["attention_mask"], needed=mask,
                                         **sampling)  # fmt: skip
            logp = token_logprobs(model, batch["input_ids"], batch["attention_mask"], needed=mask, **sampling)
            if old is None:
                old_lp = logp.detach()
            else:
                old_lp = torch.zeros_like(logp)
                for j, i in enumerate(part):
                    old_lp[j, : len(old[i])] = old[i]
            adv = torch.as_tensor(advantages[part], dtype=torch.float32, device=device)
            # token-level mean over the optimiser step: weight each micro-batch by its share of policy tokens
            loss = policy_loss(logp, old_lp, adv, mask, args.clip_low, args.clip_high) * (mask.sum() / max(n_tokens, 1))
            if ref is not None:
                # k3 estimator, clamped as verl's low_var_kl: with top-k the updated policy can give a sampled
                # token probability 0 (log-ratio +inf), where the estimate, not the KL, is infinite
                log_ratio = _on_mask(ref - logp, mask).clamp(-20.0, 20.0)
                k3 = (torch.exp(log_ratio) - 1 - log_ratio).clamp(max=10.0)
                kl = (k3 * mask).sum() / max(n_tokens, 1)
                loss = loss + args.kl_coef * kl
                stats["kl"] += float(kl.detach())
            if accelerator is None:
                loss.backward()
            else:
                if deepspeed:  # the engine reduces and steps at the boundary: the last micro-batch
                    accelerator.sync_gradients = sync
                accelerator.backward(loss * ds_scale)
        with torch.no_grad():
            ratio = torch.exp(_on_mask(logp.detach() - old_lp, mask))
            clipped = ((ratio < 1 - args.clip_low) | (ratio > 1 + args.clip_high)).float()
            stats["clipped"] += float((clipped * mask).sum())
            sampler = torch.zeros_like(old_lp)
            for j, t in enumerate(trajs):
                sampler[j, : len(t.logprobs)] = torch.as_tensor(t.logprobs, dtype=sampler.dtype)
            stats["sampler_gap"] += float((_on_mask(old_lp - sampler, mask).abs() * mask).sum())
            stats["tokens"] += int(mask.sum())
        stats["loss"] += float(loss.detach())
    if deepspeed:
        accelerator.sync_gradients = True
    params = [p for p in model.parameters() if p.requires_grad]
    if accelerator is None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    else:
        grad_norm = accelerator.clip_grad_norm_(params, args.grad_clip)
    optimizer.step()
    return float("nan") if grad_norm is None else float(grad_norm)  # DeepSpeed clips inside its engine


# ----------------------------------------------------------------------------------------------
# The training loop


def training_users(env, args: GRPOArgs) -> np.ndarray:
    """Training users after the difficulty filter, in this stage's half (seeded, disjoint halves).

    With ``train_users`` set, only the first that many of the half.
    """
    from deeprec_env.trm import rank_examples

    trm, split = env.res.retriever.trm, env.split
    ranks, _ = rank_examples(trm, split.histories(trm.config.max_len), split.targets)
    keep = split.users[(ranks >= 0) & (ranks < args.difficulty_top)]
    keep = np.random.default_rng(1234).permutation(keep)  # the same halves for both stages
    half = len(keep) // 2
    users = {"first-half": keep[:half], "second-half": keep[half:], "all": keep}[args.users]
    return users[: args.train_users] if args.train_users else users


def _step_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])


def _stats_row(rec, keys: list[str]) -> list[float]:
    return [rec.reward, float(bool(rec.format_errors)), float(rec.calls), float(rec.tokens),
            *(float(rec.episode_reward_components[k]) for k in keys)]  # fmt: skip


def train(args: GRPOArgs, env_kwargs: dict | None = None, *, progress: bool = True) -> Path:
    """Run one stage: rollouts, advantages, update; log and checkpoint every step; resume if stopped.

    Runs in one process, or in several under ``accelerate launch`` (DDP, DeepSpeed or FSDP, per the
    accelerate config): each process rolls out ``users_per_step / num_processes`` of the step's users,
    rewards are gathered so the whitening is global, gradients are averaged by the engine, and the
    main process writes the log and the checkpoint.

    Returns the checkpoint folder (``args.out/checkpoint``).
    """
    from tqdm.auto import tqdm

    accelerator = _accelerator(args)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, log_path = out / "checkpoint", out / "log.jsonl"
    if main:
        recover_checkpoint(ckpt)  # a kill between a checkpoint's two renames
    accelerator.wait_for_everyone()
    start, history, resume_from = run_state(out, args, RESUME_FREE)  # history: the log of completed steps
    if start > args.steps:  # else the checkpoint returned would be a later one than asked for
        raise RunFolderError(
            f"{out} holds a checkpoint after {start} steps, more than steps={args.steps}; a run does not "
            f"go back: give steps >= {start} to continue it, or another out folder"
        )
    model, tok, optimizer, ref_model = _trainable_model(args, accelerator, resume_from)
    if main:
        write_log(log_path, history)  # exactly the completed steps' lines
    env_kwargs, resources, envs, users = _training_environment(args, env_kwargs, world)
    policy = _rollout_policy(args, accelerator, model, tok)
    for step in tqdm(range(start, args.steps), desc=f"{args.stage}", disable=not (progress and main), initial=start,
                     total=args.steps):  # fmt: skip
        t0 = time.perf_counter()
        rollouts = _rollouts(policy, envs, users, args, step, rank, world)  # 1. sample G episodes per user
        adv = _advantages(rollouts, args, accelerator)  # 2. group baseline, global whitening
        t1 = time.perf_counter()
        stats = train_step(model, optimizer, rollouts, adv, args, tok.pad_token_id, ref_model, accelerator,
                           rng=np.random.default_rng([args.seed, step, 1]))  # 3. update  # fmt: skip
        if policy.engine is not None:
            policy.engine.load_weights(accelerator.unwrap_model(model))  # the next rollouts sample the new policy
        t2 = time.perf_counter()
        entry = _log_entry(step, args, rollouts, stats, accelerator)  # 4. log, validate, checkpoint
        if main and args.val_users and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            policy.model.eval()
            entry.update(validate(policy, env_kwargs, args.val_users, resources))
        entry.update(seconds=time.perf_counter() - t0, rollout_seconds=t1 - t0, update_seconds=t2 - t1, **memory_gib())
        history.append(entry)
        # The step's log line commits with its checkpoint: a kill before this loses the step in flight only.
        save_checkpoint(ckpt, model, tok, optimizer, step + 1, args, accelerator, extra={"log": history})
        if main:
            write_log(log_path, history)
        accelerator.wait_for_everyone()
    if main:
        plot_curves(log_path, out / "curves.png")
    accelerator.wait_for_everyone()
    return ckpt


def _accelerator(args: GRPOArgs):
    """The accelerate ``Accelerator`` of the run (one process, or one per ``accelerate launch`` rank)."""
    from accelerate import Accelerator

    if args.rollout_engine == "vllm":
        from agents.vllm_engine import require_vllm

        require_vllm()  # before anything is loaded
    # before accelerate, which runs on the CPU when asked for a GPU it cannot find
    accelerator = Accelerator(cpu=torch_device(args.device, "GRPOArgs.device").type == "cpu")
    if args.users_per_step % accelerator.num_processes:
        raise ValueError(
            f"users_per_step={args.users_per_step} must be a multiple of the {accelerator.num_processes} processes"
        )
    return accelerator


def _trainable_model(args: GRPOArgs, accelerator, resume_from: Path | None):
    """The policy (LoRA-wrapped if asked), its tokenizer, optimizer (state restored) and the KL reference."""
    from agents.llm import AdapterReference, add_lora, enable_gradient_checkpointing, load_causal_lm

    device, world = str(accelerator.device), accelerator.num_processes
    model, tok = load_causal_lm(str(resume_from or args.model), device=device, dtype=args.dtype,
                                trainable_adapter=True)  # fmt: skip
    if args.lora_r > 0:
        model = add_lora(model, args.lora_r, args.seed)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    ref_model = None
    if args.kl_coef > 0 and args.kl_reference == "adapter":  # the starting adapter beside the policy's, same base
        ref_model = AdapterReference(model, args.model)
    elif args.kl_coef > 0:
        ref_model, _ = load_causal_lm(args.model, device=device, dtype=args.dtype)
        ref_model.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=args.betas)
    if _deepspeed(accelerator):  # one optimiser step per mini-batch, clipped at args.grad_clip, inside the engine
        if args.micro_batch_tokens:
            raise ValueError(f"micro_batch_tokens={args.micro_batch_tokens}: DeepSpeed accumulates a fixed number of "
                             "micro-batches; bound memory with micro_batch instead")  # fmt: skip
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        local = args.users_per_step // world * args.group_size
        if local % args.mini_batches:
            raise ValueError(f"DeepSpeed: {local} trajectories per process do not split into {args.mini_batches} "
                             "equal mini-batches")  # fmt: skip
        ds["gradient_accumulation_steps"] = -(-(local // args.mini_batches) // args.micro_batch)
        ds["gradient_clipping"] = args.grad_clip
    if resume_from is not None and (resume_from / "optimizer.pt").is_file():
        state = torch.load(resume_from / "optimizer.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(state)
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume_from is not None and (resume_from / "engine").is_dir():
        accelerator.load_state(str(resume_from / "engine"))
    return model, tok, optimizer, ref_model


def _training_environment(args: GRPOArgs, env_kwargs: dict | None, world: int):
    """The stage's env settings, shared resources, the envs that roll out in lock step, and the users."""
    from deeprec_env.env import DeepRecEnv, EnvConfig, get_resources

    env_kwargs = args.env_kwargs(args.stage, env_kwargs)
    resources = get_resources(EnvConfig(**env_kwargs))  # built once: rollouts, difficulty filter, validation
    envs = [DeepRecEnv(resources=resources, **env_kwargs) for _ in range(args.rollout_batch)]
    users = training_users(envs[0], args)
    if len(users) < world:
        raise ValueError(
            f"{len(users)} training users have their target in the TRM's top-{args.difficulty_top}; "
            f"need at least {world}: raise difficulty_top"
        )
    return env_kwargs, resources, envs, users


def _rollout_policy(args: GRPOArgs, accelerator, model, tok):
    """The sampling policy over the model being trained (through a vLLM engine if asked)."""
    from agents.llm import LLMPolicy

    engine = None
    if args.rollout_engine == "vllm":
        from agents.vllm_engine import VLLMEngine, engine_model_path

        engine = VLLMEngine(engine_model_path(args.model), dtype=args.dtype, seed=args.seed + accelerator.process_index,
                            gpu_memory_utilization=args.vllm_gpu_memory,
                            distributed=accelerator.num_processes > 1)  # fmt: skip
        engine.load_weights(accelerator.unwrap_model(model))  # a resumed or LoRA model differs from the files
    return LLMPolicy(accelerator.unwrap_model(model), tok, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, name="grpo",
                     engine=engine)  # fmt: skip


def _rollouts(policy, envs, users: np.ndarray, args: GRPOArgs, step: int, rank: int, world: int) -> list[Rollout]:
    """This process's share of the step's users, ``group_size`` sampled episodes each (seeded by step)."""
    rng = _step_rng(args.seed, step)  # the same draw on every process
    seed = int(rng.integers(2**62))
    n_users = min(args.users_per_step, len(users)) // world * world
    chosen = rng.choice(users, size=n_users, replace=False)
    policy.generator.manual_seed(seed + rank)
    policy.model.eval()  # the unwrapped model: the one that generates
    return collect_rollouts(policy, envs, [int(u) for u in chosen[rank::world]], args.group_size)


def _advantages(rollouts: list[Rollout], args: GRPOArgs, accelerator) -> np.ndarray:
    """This process's advantages, whitened over every process's rewards."""
    local = torch.as_tensor(group_rewards(rollouts, args.group_size), device=accelerator.device)
    rewards = accelerator.gather(local).cpu().numpy()  # (n_users, G), process by process
    rank = accelerator.process_index
    return compute_advantages(rewards, args.whiten)[rank * len(local) : (rank + 1) * len(local)].reshape(-1)


def varying_groups(rollouts: list[Rollout], group_size: int, keys: list[str]) -> list[int]:
    """How many groups' samples differ in their reward, then in each reward component of ``keys``.

    A group whose ``group_size`` rewards are all equal has advantage 0 everywhere: it teaches nothing (TRL logs
    the complement, ``frac_reward_zero_std``). Per component (summed over the episode, weighted or not) it tells
    which part of the reward the signal comes from (in stage 2: how many groups differ in ``hit``) and where
    there could be one (``retrieval_hit``, given at the calls: how many groups' calls differ in retrieving the
    target).

    >>> from types import SimpleNamespace as N
    >>> ro = lambda r, hit: N(reward=r, record=N(episode_reward_components={"hit": hit}))
    >>> varying_groups([ro(1.0, 1.0), ro(0.5, 0.0), ro(0.5, 0.0), ro(0.5, 0.0)], 2, ["hit"])
    [1, 1]
    """
    values = np.array([[ro.reward, *(ro.record.episode_reward_components[k] for k in keys)] for ro in rollouts],
                      dtype=float)  # fmt: skip
    values = values.reshape(-1, group_size, 1 + len(keys))
    return [int(n) for n in (np.ptp(values, axis=1) > 1e-9).sum(axis=0)]


def _log_entry(step: int, args: GRPOArgs, rollouts: list[Rollout], stats: dict, accelerator) -> dict:
    """The step's log line: episode statistics averaged over every process, and the update's."""
    world = accelerator.num_processes
    keys = sorted(rollouts[0].record.episode_reward_components)
    rows = torch.tensor([_stats_row(r.record, keys) for r in rollouts], device=accelerator.device)
    rows = accelerator.gather(rows).cpu().numpy().mean(axis=0)
    totals = accelerator.reduce(torch.tensor([stats["loss"], stats["kl"], stats["policy_tokens"]],
                                             dtype=torch.float64, device=accelerator.device), "sum")  # fmt: skip
    varying = accelerator.reduce(torch.tensor(varying_groups(rollouts, args.group_size, keys),
                                              dtype=torch.float64, device=accelerator.device), "sum")  # fmt: skip
    n_groups = len(rollouts) // args.group_size * world
    return {
        "step": step,
        "stage": args.stage,
        "reward": float(rows[0]),
        **{f"reward_{k}": float(v) for k, v in zip(keys, rows[4:], strict=True)},
        "format_fail": float(rows[1]),
        "calls": float(rows[2]),
        "tokens": float(rows[3]),
        "loss": float(totals[0]) / world,
        "grad_norm": stats["grad_norm"],
        "kl": float(totals[1]) / world,
        "policy_tokens": int(totals[2]),
        "updates": stats["updates"],
        "clip_fraction": stats["clip_fraction"],
        "sampler_gap": stats["sampler_gap"],
        "signal_groups": float(varying[0]) / n_groups,
        **{f"signal_groups_{k}": float(v) / n_groups for k, v in zip(keys, varying[1:], strict=True)},
        "processes": world,
    }


def main(argv=None) -> None:
    """CLI: ``python -m agents.grpo`` takes every :class:`GRPOArgs` field (one stage; see agents.curriculum)."""
    from deeprec_env.cli import parse_dataclass

    args = parse_dataclass(GRPOArgs, argv, __doc__)
    with run_folder_errors():  # a reused folder with other settings: one line, not a traceback
        print(f"checkpoint: {train(args)}")


if __name__ == "__main__":
    main()
