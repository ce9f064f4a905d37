"""REINFORCE++ with a group baseline (DESIGN.md section 5), on DeepRec-v0.

Per step: draw ``users_per_step`` training users; sample ``group_size`` episodes for each (same user,
same reset options); the reward is the environment's total for the stage, given once per trajectory;
advantage = reward - group mean, then global whitening; every policy token of a trajectory gets its
advantage; PPO-style clipped loss with the asymmetric clip (1 - 0.2, 1 + 0.28), no critic, optional
KL to a frozen reference model (coefficient 0 by default), tokens the environment inserted masked out;
gradient clipping and Adam (0.9, 0.95).

Reads top to bottom: :class:`GRPOArgs`, :func:`compute_advantages`, :func:`policy_loss`,
:func:`train_step`, then :func:`train` (the loop with logging, checkpoints and resume).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from agents.rollout import Rollout, collect_rollouts, group_rewards, pad_batch, token_logprobs


@dataclass(frozen=True)
class GRPOArgs:
    """Every setting of one RL stage. Defaults run on a laptop CPU; see ``PAPER_SCALE`` for the paper's."""

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
    whiten: Literal["divide", "multiply", "none"] = "divide"
    """Global whitening of advantages: divide by the std (correct), multiply (the reference's bug), none."""
    temperature: float = 1.0
    """Sampling temperature of rollouts."""
    max_new_tokens: int = 192
    """Tokens per generated segment."""
    micro_batch: int = 2
    """Trajectories per forward/backward pass (gradient accumulation over the step)."""
    rollout_batch: int = 8
    """Episodes generated in lock step."""
    dataset: str = "ml-100k"
    """Dataset of the environment."""
    prompt: Literal["base", "chat"] = "chat"
    """Prompt variant (chat for instruct models)."""
    prompt_history: int = 20
    """History items shown in the prompt (fewer: shorter prompts, faster steps on a CPU)."""
    difficulty_top: int = 100
    """Drop training users whose target is outside the TRM's top-N (no preference)."""
    users: str = "first-half"
    """Which filtered training users this stage draws from: 'first-half', 'second-half' or 'all'."""
    val_users: int = 16
    """Fixed validation subset evaluated (greedy) every ``eval_every`` steps (0 disables)."""
    eval_every: int = 5
    """Steps between validation evaluations."""
    lora_r: int = 0
    """LoRA rank through peft (0: full fine-tuning)."""
    device: str = "cpu"
    """Torch device (use accelerate launch for several GPUs)."""
    dtype: str = "float32"
    """Model dtype."""
    seed: int = 0
    """Seed of user draws and sampling (a step's randomness depends only on (seed, step))."""
    out: str = "runs/grpo"
    """Run folder: log.jsonl, curves.png, checkpoint/."""

    def __post_init__(self) -> None:
        for name in ("steps", "users_per_step", "group_size", "micro_batch", "rollout_batch", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; must be >= 1")
        if self.whiten not in ("divide", "multiply", "none"):
            raise ValueError(f"whiten={self.whiten!r}; must be 'divide', 'multiply' or 'none'")
        if self.users not in ("first-half", "second-half", "all"):
            raise ValueError(f"users={self.users!r}; must be 'first-half', 'second-half' or 'all'")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"clip_low={self.clip_low}, clip_high={self.clip_high}; need 0 <= low < 1, high >= 0")


PAPER_SCALE = {
    "coldstart": dict(model="Qwen/Qwen2.5-7B", stage="coldstart", steps=20, users_per_step=128, group_size=8,
                      lr=1e-6, dtype="bfloat16", device="cuda", prompt="base", dataset="ml-1m"),
    "rec": dict(model="<stage-1 checkpoint>", stage="rec", steps=80, users_per_step=128, group_size=8,
                lr=1e-6, dtype="bfloat16", device="cuda", prompt="base", dataset="ml-1m"),
}  # fmt: skip
"""The paper's settings per stage (Qwen2.5-7B base, 128 users x 8 samples, lr 1e-6, bf16, 20 + 80 steps)."""


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
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    return -(surrogate * mask).sum() / mask.sum().clamp(min=1)


def train_step(model, optimizer, rollouts: list[Rollout], advantages: np.ndarray, args: GRPOArgs, pad_id: int,
               ref_model=None) -> dict:  # fmt: skip
    """One optimiser step over the step's rollouts (micro-batched); returns loss statistics."""
    device = next(model.parameters()).device
    model.train()
    optimizer.zero_grad(set_to_none=True)
    n_tokens = sum(sum(r.trajectory.policy_mask) for r in rollouts)
    total_loss, kl_sum = 0.0, 0.0
    for s in range(0, len(rollouts), args.micro_batch):
        chunk = rollouts[s : s + args.micro_batch]
        batch = {k: v.to(device) for k, v in pad_batch([r.trajectory for r in chunk], pad_id).items()}
        with torch.no_grad():  # the sampling policy's log-probs (the weights before this update)
            old = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
        logp = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
        adv = torch.as_tensor(advantages[s : s + len(chunk)], dtype=torch.float32, device=device)
        mask = batch["loss_mask"]
        # token-level mean over the whole step: weight each micro-batch by its share of policy tokens
        loss = policy_loss(logp, old, adv, mask, args.clip_low, args.clip_high) * (mask.sum() / max(n_tokens, 1))
        if ref_model is not None and args.kl_coef > 0:
            with torch.no_grad():
                ref = token_logprobs(ref_model, batch["input_ids"], batch["attention_mask"])
            log_ratio = ref - logp
            kl = ((torch.exp(log_ratio) - 1 - log_ratio) * mask).sum() / max(n_tokens, 1)  # k3 estimator
            loss = loss + args.kl_coef * kl
            kl_sum += float(kl)
        loss.backward()
        total_loss += float(loss.detach())
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip))
    optimizer.step()
    return {"loss": total_loss, "grad_norm": grad_norm, "kl": kl_sum, "policy_tokens": int(n_tokens)}


# ----------------------------------------------------------------------------------------------
# The training loop


def training_users(env, args: GRPOArgs) -> np.ndarray:
    """Training users after the difficulty filter, split into this stage's half (seeded, disjoint halves)."""
    from deeprec_env.trm import evaluate_ranks

    res = env.res
    ranks = evaluate_ranks(res.retriever.trm, res.dataset, "train")
    split = res.dataset.split("train")
    keep = split.users[(ranks >= 0) & (ranks < args.difficulty_top)]
    keep = np.random.default_rng(1234).permutation(keep)  # the same halves for both stages
    half = len(keep) // 2
    return {"first-half": keep[:half], "second-half": keep[half:], "all": keep}[args.users]


def _step_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])


def save_checkpoint(path: Path, model, tokenizer, optimizer, step: int, args: GRPOArgs) -> None:
    """Model, tokenizer, optimizer state and step, written to a temporary folder then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "args": asdict(args)}, indent=2))
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def validate(policy, env_kwargs: dict, n_users: int) -> dict:
    """Greedy Recall/NDCG on the first ``n_users`` of a seeded order of the valid split (a fixed subset)."""
    from agents.evaluate import episode_options, evaluate_agent, summarize
    from deeprec_env.env import EnvConfig, get_resources

    kwargs = {**env_kwargs, "split": "valid"}
    n = len(get_resources(EnvConfig(**kwargs)).dataset.split("valid"))
    saved = policy.temperature
    policy.temperature = 0.0
    try:
        recs = evaluate_agent(policy, kwargs, episode_options(n, n_users, 0), batch_size=min(8, n_users),
                              progress=False)  # fmt: skip
    finally:
        policy.temperature = saved
    s = summarize(recs)
    return {f"val_{k}": s[k] for k in ("recall@10", "ndcg@10", "format_fail", "calls")}


def train(args: GRPOArgs, env_kwargs: dict | None = None, *, progress: bool = True) -> Path:
    """Run one stage: rollouts, advantages, update; log every step, checkpoint every step, resume if stopped.

    Returns the checkpoint folder (``args.out/checkpoint``).
    """
    from tqdm.auto import tqdm

    from agents.llm import LLMPolicy, load_causal_lm
    from deeprec_env.env import DeepRecEnv

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    log_path = out / "log.jsonl"
    start = 0
    source = args.model
    if (ckpt / "trainer_state.json").is_file():  # resume
        start = json.loads((ckpt / "trainer_state.json").read_text())["step"]
        source = str(ckpt)
    model, tok = load_causal_lm(source, device=args.device, dtype=args.dtype)
    if args.lora_r > 0 and start == 0:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise ImportError("LoRA needs peft: pip install peft") from e
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, task_type="CAUSAL_LM"))
    ref_model = None
    if args.kl_coef > 0:
        ref_model, _ = load_causal_lm(args.model, device=args.device, dtype=args.dtype)
        ref_model.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=args.betas)
    if start and (ckpt / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=args.device))
    if start:  # keep only the log lines of completed steps
        lines = (
            [ln for ln in log_path.read_text().splitlines() if json.loads(ln)["step"] < start]
            if log_path.exists()
            else []
        )
        log_path.write_text("".join(ln + "\n" for ln in lines))
    env_kwargs = {"dataset": args.dataset, "stage": args.stage, "prompt": args.prompt, "split": "train",
                  "prompt_history": args.prompt_history, **(env_kwargs or {})}  # fmt: skip
    envs = [DeepRecEnv(**env_kwargs) for _ in range(args.rollout_batch)]
    users = training_users(envs[0], args)
    if len(users) == 0:
        raise ValueError(
            f"no training user has its target in the TRM's top-{args.difficulty_top}; raise difficulty_top"
        )
    policy = LLMPolicy(model, tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature, name="grpo")
    for step in tqdm(range(start, args.steps), desc=f"{args.stage}", disable=not progress, initial=start,
                     total=args.steps):  # fmt: skip
        t0 = time.perf_counter()
        rng = _step_rng(args.seed, step)
        policy.generator.manual_seed(int(rng.integers(2**62)))
        chosen = rng.choice(users, size=min(args.users_per_step, len(users)), replace=False)
        model.eval()
        rollouts = collect_rollouts(policy, envs, [int(u) for u in chosen], args.group_size)
        rewards = group_rewards(rollouts, args.group_size)
        adv = compute_advantages(rewards, args.whiten).reshape(-1)
        stats = train_step(model, optimizer, rollouts, adv, args, tok.pad_token_id, ref_model)
        recs = [r.record for r in rollouts]
        entry = {
            "step": step,
            "stage": args.stage,
            "reward": float(rewards.mean()),
            **{
                f"reward_{k}": float(np.mean([r.reward_components[k] for r in recs])) for k in recs[0].reward_components
            },
            "format_fail": float(np.mean([bool(r.format_errors) for r in recs])),
            "calls": float(np.mean([r.calls for r in recs])),
            "tokens": float(np.mean([r.tokens for r in recs])),
            **stats,
            "seconds": time.perf_counter() - t0,
        }
        save_checkpoint(ckpt, model, tok, optimizer, step + 1, args)
        if args.val_users and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            model.eval()
            entry.update(validate(policy, env_kwargs, args.val_users))
        with open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
    plot_curves(log_path, out / "curves.png")
    return ckpt


def plot_curves(log_path: Path, png: Path) -> None:
    """Reward, calls and format-failure curves of a run (one PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in Path(log_path).read_text().splitlines()] if Path(log_path).exists() else []
    if not rows:
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes, ("reward", "calls", "format_fail"), strict=True):
        ax.plot(steps, [r[key] for r in rows], marker="o")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
