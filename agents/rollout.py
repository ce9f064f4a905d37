"""Grouped multi-turn rollouts: G sampled episodes per user, with token ids, loss masks and rewards.

The loss mask of a trajectory is the LLM policy's ``policy_mask`` (1 for tokens it generated, 0 for
the prompt and the item lists the environment inserted), recorded as tokens were appended: nothing is
re-tokenised to find the inserted spans.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch

from agents.base import EpisodeRecord, play_episodes
from agents.llm import LLMPolicy, Trajectory


@dataclass
class Rollout:
    """One sampled episode, ready for a policy-gradient update."""

    user: int
    """Dataset user index (the group key)."""
    trajectory: Trajectory
    """Token ids, policy mask and sampling log-probs."""
    record: EpisodeRecord
    """Reward, components and metrics of the episode."""

    @property
    def reward(self) -> float:
        """Total episode reward (the environment's weighted sum, given once per trajectory)."""
        return self.record.reward


def collect_rollouts(
    policy: LLMPolicy, envs: list, users: list[int], group_size: int, *, batch_size: int | None = None
) -> list[Rollout]:
    """``group_size`` episodes for every user (same user, same reset options), generated in lock step.

    Args:
        policy: a sampling :class:`~agents.llm.LLMPolicy` (temperature > 0 for distinct samples).
        envs: environments to run in parallel (their number caps the batch).
        users: dataset user indices of the training episodes' split.
        group_size: samples per user (G).
        batch_size: episodes per lock-step batch (default: ``len(envs)``).

    Returns:
        Rollouts ordered user by user, ``group_size`` consecutive ones per user.
    """
    if group_size < 1:
        raise ValueError(f"group_size={group_size}; must be >= 1")
    batch = min(batch_size or len(envs), len(envs))
    jobs = [u for u in users for _ in range(group_size)]
    out: list[Rollout] = []
    for s in range(0, len(jobs), batch):
        chunk = jobs[s : s + batch]
        records, states = play_episodes(policy, envs[: len(chunk)], [{"user": int(u)} for u in chunk])
        out.extend(Rollout(int(u), st["traj"], rec) for u, st, rec in zip(chunk, states, records, strict=True))
    return out


TRAINING_EPISODES = {"split": "test", "user_group": "rl"}
"""Where training episodes come from: the last item of each user of the RL group."""
VALIDATION_EPISODES = {"split": "valid", "user_group": "eval"}
"""Where training runs validate: the second-last item of the evaluation group's users (never trained on,
and not the test targets the final evaluation uses)."""


@dataclass(frozen=True)
class EpisodeSettings:
    """The episode settings every training run shares (RL stages and warm start).

    A warm start and the RL stages after it must see the same episodes: the curriculum copies these
    fields from one to the other (:func:`episode_settings`).
    """

    dataset: str = "ml-100k"
    """Dataset of the environment (ml-100k, ml-1m, amazon, atomic, synthetic)."""
    dataset_path: str | None = None
    """File or folder of the dataset (all but ml-100k and synthetic)."""
    prompt: Literal["base", "chat"] = "chat"
    """Prompt variant (chat for instruct models)."""
    prompt_history: int = 20
    """History items shown in the prompt (fewer: shorter prompts, faster steps on a CPU)."""
    retrieval_k: int = 20
    """Items the TRM returns per call (fewer: shorter contexts, faster steps on a CPU)."""

    def env_kwargs(self, stage: str, extra: dict | None = None) -> dict:
        """Environment settings of a training run in ``stage`` (``extra`` wins).

        Training episodes are the test targets of the RL user group: the same kind of target as the
        evaluation's, on users the evaluation never sees (``docs/evaluation.md``).
        """
        return {**episode_settings(self), "stage": stage, **TRAINING_EPISODES, **(extra or {})}


def episode_settings(args: EpisodeSettings) -> dict:
    """The :class:`EpisodeSettings` fields of ``args`` (any subclass) as a dict."""
    return {f.name: getattr(args, f.name) for f in fields(EpisodeSettings)}


def last_segment_only(trajectory: Trajectory) -> Trajectory:
    """A copy of ``trajectory`` whose only policy tokens are its last generated segment (after the last call).

    The earlier segments (reasoning and tool calls) become context, like the environment's tokens: a loss on
    the copy leaves their tokens out. Their log-probs become 0, as for every token outside the policy mask.
    """
    mask = list(trajectory.policy_mask)
    start = len(mask)
    while start > 0 and not mask[start - 1]:  # trailing context (none from LLMPolicy, which ends on a segment)
        start -= 1
    while start > 0 and mask[start - 1]:
        start -= 1
    keep = [int(i >= start and m) for i, m in enumerate(mask)]
    logprobs = [lp if k else 0.0 for lp, k in zip(trajectory.logprobs, keep, strict=True)]
    return Trajectory(ids=list(trajectory.ids), policy_mask=keep, logprobs=logprobs,
                      segments=list(trajectory.segments), n_prompt=trajectory.n_prompt)  # fmt: skip


def pad_batch(trajectories: list[Trajectory], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``loss_mask`` (policy tokens) of trajectories."""
    width = max(len(t.ids) for t in trajectories)
    ids = torch.full((len(trajectories), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(trajectories), width), dtype=torch.long)
    loss = torch.zeros((len(trajectories), width), dtype=torch.float32)
    for r, t in enumerate(trajectories):
        n = len(t.ids)
        ids[r, :n] = torch.as_tensor(t.ids)
        attn[r, :n] = 1
        loss[r, :n] = torch.as_tensor(t.policy_mask, dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def sampling_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``logits`` turned into the distribution a sampler draws from.

    Divided by ``temperature``, then everything outside the ``top_k`` best (0: off) and outside the
    ``top_p`` nucleus (1: off) set to -inf: the same transformations, in the same order, as transformers'
    temperature, top-k and top-p warpers, so a policy-gradient loss on these log-probs is on the
    distribution the rollouts were sampled from.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}; sampling needs temperature > 0")
    x = logits / temperature if temperature != 1.0 else logits
    if top_k > 0 and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=False)
        cumulative = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -1:] = False  # keep at least the best token
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return x


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    share_prefix: bool = False,
    needed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probability of every token given its prefix, ``(B, L)``; position 0 gets 0.

    With ``temperature``/``top_k``/``top_p``: under the sampling distribution (:func:`sampling_logits`).
    With ``share_prefix``, the tokens every row starts with (a prompt's instructions) go through the model
    once, not once per row (:func:`agents.kv.shared_prefix_logits`; the same values and gradients up to float
    rounding); shorter than :attr:`agents.kv.KVBatch.MIN_SHARED` tokens, the batch runs as one.
    ``needed`` (``(B, L)``, non-zero where a log-prob is used: the loss mask): the vocabulary projection, and the
    vocabulary-sized tensors after it, start at the batch's first needed column (transformers'
    ``logits_to_keep``), so a prompt costs no logits; the columns before it come back 0, the others are as without.
    """

    def logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if (temperature, top_k, top_p) != (1.0, 0, 1.0):
            logits = sampling_logits(logits, temperature, top_k, top_p)
        return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    from agents.kv import KVBatch, _forward_parameters, shared_prefix_length, shared_prefix_logits

    width = input_ids.shape[1]
    first = 1  # the first column whose log-prob is returned; its logits are those of column first - 1
    if needed is not None and needed.shape != input_ids.shape:
        raise ValueError(f"needed has shape {tuple(needed.shape)}; input_ids {tuple(input_ids.shape)}")
    if needed is not None and width > 1:
        cols = needed[:, 1:].any(0).nonzero()
        first = int(cols[0]) + 1 if len(cols) else 1
    keep = (lambda n: {"logits_to_keep": n}) if "logits_to_keep" in _forward_parameters(model) else (lambda n: {})
    shared = shared_prefix_length(input_ids, attention_mask) if share_prefix else 0
    if shared < KVBatch.MIN_SHARED:
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **keep(width - first + 1)
        ).logits
        lp = logprobs(logits[:, -(width - first + 1) : -1], input_ids[:, first:])
    elif first >= shared:  # the prefix is context: at most its last column's logits are needed
        tail_keep = keep(width - first + 1) if first > shared else {}
        head, tail = shared_prefix_logits(model, input_ids, attention_mask, shared, keep(1), tail_keep)
        if first == shared:
            tail = torch.cat([head[:, -1:].expand(input_ids.shape[0], -1, -1), tail], dim=1)
        lp = logprobs(tail[:, -(width - first + 1) : -1], input_ids[:, first:])
    else:
        head, tail = shared_prefix_logits(model, input_ids, attention_mask, shared)
        rows = input_ids.shape[0]
        inside = logprobs(head[:, first - 1 : -1], input_ids[:1, first:shared]).expand(rows, -1)  # the prefix's own
        after = logprobs(torch.cat([head[:, -1:].expand(rows, -1, -1), tail[:, :-1]], dim=1), input_ids[:, shared:])
        lp = torch.cat([inside, after], dim=1)
    return torch.cat([lp.new_zeros((lp.shape[0], first)), lp], dim=1)


def group_rewards(rollouts: list[Rollout], group_size: int) -> np.ndarray:
    """``(n_users, group_size)`` reward matrix of rollouts ordered user by user."""
    r = np.array([ro.reward for ro in rollouts], dtype=np.float64)
    if len(r) % group_size:
        raise ValueError(f"{len(r)} rollouts is not a multiple of group_size={group_size}")
    return r.reshape(-1, group_size)
