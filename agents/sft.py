"""Supervised warm start on scripted-agent transcripts, before RL (an option; not in the paper's recipe).

A base model as small as SmolLM2-135M never emits the call tag on its own, so group-relative RL gets
no signal: every sample of every group scores -1 and every advantage is 0. A warm start fixes that.
A scripted agent (by default ``history-facet``, calling the TRM 1, 2 or 3 times per episode) plays
episodes through the environment; each episode is recorded as the token sequence an
:class:`~agents.llm.LLMPolicy` would have produced (prompt through the same chat template, the
agent's segments, the item lists the environment inserted), and the model is fine-tuned with
cross-entropy on the agent's segments only: the same policy mask the RL loss uses.

The varied number of calls is deliberate: the warm-started policy calls 1-3 times, and stage 1's
invocation reward (0 for one call, 0.5 for two, 1.0 for three) is left for RL to discover.

    python -m agents.sft --episodes 48 --epochs 2 --out runs/warmstart
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from agents.base import Policy, play_episodes
from agents.llm import Trajectory, check_checkpointing, check_optimiser, prompt_text
from agents.rollout import EpisodeSettings, pad_batch, token_logprobs
from deeprec_env.config import Device, Dtype, check_fields


@dataclass(frozen=True)
class SFTArgs(EpisodeSettings):
    """Every setting of the warm start (the episode fields must match the RL stages that follow)."""

    model: str = "smollm2"
    """Model to fine-tune: 'smollm2' (embedded), a hub id or a local path."""
    teacher: str = "history-facet"
    """Scripted agent that plays the demonstrations (a name in ``agents.baselines.BASELINES``; ``unseen-mix``,
    ``agents.baselines.UnseenMixPolicy``; or ``hint-mix``: the positive control's teacher,
    ``agents.baselines.HintMixPolicy``, on an env with ``target_hint``)."""
    teacher_calls: tuple[int, ...] = (1, 2, 3)
    """Calls per demonstration, drawn per episode (history-facet only)."""
    teacher_hint_share: float = 0.25
    """Share of the demonstrations whose call copies the prompt's hint (hint-mix only)."""
    teacher_unseen_share: float = 0.25
    """Share of the demonstrations whose answer skips the prompt's history titles (unseen-mix only)."""
    episodes: int = 48
    """Demonstration episodes (distinct training users)."""
    epochs: int = 2
    """Passes over the demonstrations."""
    batch: int = 8
    """Demonstrations per optimiser step."""
    micro_batch: int = 1
    """Demonstrations per forward/backward pass."""
    share_prefix: bool = False
    """Run the prompt prefix a micro-batch's demonstrations share once (as ``GRPOArgs.share_prefix``)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (as ``GRPOArgs.gradient_checkpointing``); not with share_prefix."""
    lr: float = 5e-5
    """Adam learning rate (LoRA wants a larger one than full fine-tuning, e.g. 1e-3)."""
    lora_r: int = 0
    """LoRA rank through peft (0: full fine-tuning). The RL stages continue training the same adapter."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    device: Device = "cpu"
    """Torch device."""
    dtype: Dtype = "float32"
    """Model dtype."""
    seed: int = 0
    """Seed of the user draw, the teacher's call counts and the batch order."""
    out: str = "runs/warmstart"
    """Run folder: log.jsonl and checkpoint/."""

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("episodes", "epochs", "batch", "micro_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; must be >= 1")
        for name in ("teacher_hint_share", "teacher_unseen_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:  # nan fails too
                raise ValueError(f"{name}={getattr(self, name)}; must be in [0, 1]")
        check_teacher(self.teacher)
        check_optimiser(self)
        check_checkpointing(self)


RESUME_FREE = frozenset({"micro_batch", "share_prefix", "gradient_checkpointing", "out"})
"""The :class:`SFTArgs` fields that may differ when a warm start resumes or its finished checkpoint is reused:
how a step is cut into passes (the same gradient up to float rounding) and the folder (a copied warm start);
any other change is a :class:`~agents.runs.RunFolderError` (a ``ValueError``)."""


class TranscriptRecorder(Policy):
    """Wraps a scripted policy and records its episodes as token trajectories (policy mask included).

    The trajectory is built exactly as :class:`~agents.llm.LLMPolicy` builds one: the prompt through
    :func:`~agents.llm.prompt_text`, then per turn the environment's observation (mask 0) and the
    agent's segment (mask 1), each tokenised on its own.
    """

    def __init__(self, teacher: Policy, tokenizer) -> None:
        self.teacher = teacher
        self.tokenizer = tokenizer
        self.name = f"recorded:{teacher.name}"

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def start(self, env, obs: str, info: dict) -> dict:
        """Start the teacher's episode and tokenise the prompt."""
        traj = Trajectory()
        traj.extend(self._encode(prompt_text(self.tokenizer, env, obs, info)), policy=False)
        traj.n_prompt = len(traj.ids)
        return {"inner": self.teacher.start(env, obs, info), "traj": traj, "fresh": True}

    def act(self, state: dict, obs: str) -> str:
        """Append the observation, ask the teacher for the next segment, append it as policy tokens."""
        if not state["fresh"] and obs:
            state["traj"].extend(self._encode(obs), policy=False)
        state["fresh"] = False
        text = self.teacher.act(state["inner"], obs)
        state["traj"].extend(self._encode(text), policy=True)
        state["traj"].segments.append(text)
        return text

    def tokens(self, state: dict) -> int:
        """Policy tokens of the recorded episode."""
        return int(sum(state["traj"].policy_mask))


def check_teacher(name: str) -> None:
    """A ValueError unless ``name`` is a scripted agent a policy may learn from (:attr:`SFTArgs.teacher`)."""
    from agents.baselines import BASELINES, HintMixPolicy, UnseenMixPolicy

    teachers = {**BASELINES, HintMixPolicy.name: HintMixPolicy, UnseenMixPolicy.name: UnseenMixPolicy}
    if name not in teachers:
        allowed = sorted(n for n, cls in teachers.items() if not cls.privileged)
        raise ValueError(f"teacher={name!r}; must be one of {allowed}")
    if teachers[name].privileged:
        raise ValueError(f"teacher={name!r} reads the target: a policy must not learn from it")


def make_teacher(args: SFTArgs) -> Policy:
    """The scripted agent named by ``args.teacher`` (checked when ``args`` was built)."""
    from agents.baselines import BASELINES, HintMixPolicy, HistoryFacetPolicy, UnseenMixPolicy

    if args.teacher == "history-facet":
        return HistoryFacetPolicy(n_calls=tuple(args.teacher_calls), seed=args.seed)
    if args.teacher == HintMixPolicy.name:
        return HintMixPolicy(share=args.teacher_hint_share, seed=args.seed)
    if args.teacher == UnseenMixPolicy.name:
        return UnseenMixPolicy(share=args.teacher_unseen_share, seed=args.seed)
    return BASELINES[args.teacher]()


def demonstrations(teacher: Policy, tokenizer, env_kwargs: dict, users: list[int], *, batch: int = 16):
    """Play ``teacher`` on ``users`` (one episode each); returns ``(trajectories, records)``.

    Episodes that fail the format check are dropped (a teacher should not teach a malformed answer).
    """
    from deeprec_env.env import DeepRecEnv, EnvConfig, get_resources

    recorder = TranscriptRecorder(teacher, tokenizer)
    resources = get_resources(EnvConfig(**env_kwargs))
    envs = [DeepRecEnv(resources=resources, **env_kwargs) for _ in range(min(batch, len(users)))]
    trajs, recs = [], []
    for s in range(0, len(users), len(envs)):
        chunk = users[s : s + len(envs)]
        records, states = play_episodes(recorder, envs[: len(chunk)], [{"user": int(u)} for u in chunk])
        for rec, st in zip(records, states, strict=True):
            if not rec.format_errors:
                trajs.append(st["traj"])
                recs.append(rec)
    return trajs, recs


def sft_loss(model, batch: dict[str, torch.Tensor], share_prefix: bool = False) -> tuple[torch.Tensor, int]:
    """Mean token cross-entropy on policy tokens (``loss_mask`` 1); returns ``(loss, n_tokens)``.

    ``share_prefix``: the rows' common prompt prefix runs once (:func:`agents.rollout.token_logprobs`).
    """
    mask = batch["loss_mask"]
    lp = token_logprobs(model, batch["input_ids"], batch["attention_mask"], share_prefix=share_prefix, needed=mask)
    n = int(mask.sum())
    return -(lp * mask).sum() / max(n, 1), n


def train_sft(args: SFTArgs, env_kwargs: dict | None = None, *, progress: bool = True) -> Path:
    """Record demonstrations, fine-tune on them, save ``args.out/checkpoint``; returns that folder.

    Every optimiser step is checkpointed with its log line, so a killed warm start resumes at the step in
    flight with the numbers of an uninterrupted run (the demonstrations and the shuffles are replayed from
    the seed), and the finished state's ``seconds`` adds the logged time of the steps a killed process completed
    to the finishing process's wall time (the killed process's loading and recording are not in it). A finished
    checkpoint (``trainer_state.json`` with ``"done": true``) is reused, so re-running
    a curriculum does not repeat the warm start; a checkpoint written with other settings than ``args``
    (bar :data:`RESUME_FREE`) is a :class:`~agents.runs.RunFolderError`, not silently reused or continued.
    """
    from tqdm.auto import tqdm

    from agents.llm import add_lora, enable_gradient_checkpointing, load_causal_lm
    from agents.runs import memory_gib, recover_checkpoint, run_state, save_checkpoint, write_log

    out = Path(args.out)
    ckpt = out / "checkpoint"
    recover_checkpoint(ckpt)
    start, history, resume_from = run_state(out, args, RESUME_FREE)  # other settings: a ValueError
    if resume_from is not None and json.loads((ckpt / "trainer_state.json").read_text()).get("done"):
        return ckpt
    out.mkdir(parents=True, exist_ok=True)
    t0, earlier = time.perf_counter(), sum(h["seconds"] for h in history)  # steps a killed process completed
    model, tok = load_causal_lm(str(resume_from or args.model), device=args.device, dtype=args.dtype,
                                trainable_adapter=True)  # fmt: skip
    if args.lora_r > 0:
        model = add_lora(model, args.lora_r, args.seed)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    env_kwargs = args.env_kwargs("rec", env_kwargs)
    from deeprec_env.env import EnvConfig, episode_split, get_resources

    config = EnvConfig(**env_kwargs)
    pool = episode_split(config, get_resources(config).dataset).users
    rng = np.random.default_rng(args.seed)
    users = rng.permutation(pool)[: args.episodes].tolist()
    trajs, recs = demonstrations(make_teacher(args), tok, env_kwargs, users)
    if not trajs:
        raise ValueError(f"the teacher {args.teacher!r} produced no well-formed episode to learn from")
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=args.betas)
    if resume_from is not None and (resume_from / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(resume_from / "optimizer.pt", map_location=device, weights_only=True))
    log_path = out / "log.jsonl"
    write_log(log_path, history)  # exactly the completed steps' lines
    n_steps = args.epochs * -(-len(trajs) // args.batch)
    bar = tqdm(total=n_steps, desc="warm start (SFT)", disable=not progress, initial=start)
    step = 0
    for epoch in range(args.epochs):
        order = rng.permutation(len(trajs))  # drawn for every epoch, resumed or not: the same shuffles
        for s in range(0, len(order), args.batch):
            if step < start:  # done before the run was stopped
                step += 1
                continue
            ts = time.perf_counter()
            chunk = [trajs[i] for i in order[s : s + args.batch]]
            total = sum(sum(t.policy_mask) for t in chunk)
            model.train()
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for m in range(0, len(chunk), args.micro_batch):
                padded = pad_batch(chunk[m : m + args.micro_batch], tok.pad_token_id)
                batch = {k: v.to(device) for k, v in padded.items()}
                loss, n = sft_loss(model, batch, args.share_prefix)
                (loss * (n / max(total, 1))).backward()  # token mean over the whole step
                loss_sum += float(loss.detach()) * n
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip))
            optimizer.step()
            history.append({"step": step, "epoch": epoch, "loss": loss_sum / max(total, 1), "grad_norm": grad_norm,
                            "policy_tokens": int(total), "seconds": time.perf_counter() - ts,
                            **memory_gib()})  # fmt: skip
            step += 1
            # the log line commits with the step's checkpoint: a kill loses at most the step in flight
            save_checkpoint(ckpt, model, tok, optimizer, step, args, extra={"log": history})
            write_log(log_path, history)
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
            bar.update()
    bar.close()
    model.eval()
    summary = {
        "done": True,
        "log": history,
        "demonstrations": len(trajs),
        "dropped": len(users) - len(trajs),
        "teacher_calls_mean": float(np.mean([r.calls for r in recs])),
        "teacher_ndcg@10": float(np.mean([r.metrics["ndcg@10"] for r in recs])),
        "mean_tokens": float(np.mean([len(t.ids) for t in trajs])),
        "seconds": time.perf_counter() - t0 + earlier,  # resumed: plus the earlier process's logged steps
    }
    save_checkpoint(ckpt, model, tok, optimizer, step, args, extra=summary)  # "done" lands with the weights
    return ckpt


def main(argv=None) -> None:
    """CLI: every :class:`SFTArgs` field."""
    from deeprec_env.cli import parse_dataclass

    print(f"warm-start checkpoint: {train_sft(parse_dataclass(SFTArgs, argv, __doc__))}")


if __name__ == "__main__":
    main()
