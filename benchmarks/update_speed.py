"""Policy-update speed: the loss's forward and backward, four ways (shared prefix, logits of policy tokens only).

Every trajectory of a step starts with the same instructions (~600 of the ~1,100 tokens of a chat episode
with 5 history items and 10 items per call). ``share_prefix`` (``GRPOArgs``/``SFTArgs``) runs that prefix
once per micro-batch, as a batch of one, and the rest of every row on top of its repeated KV cache
(``agents.kv.shared_prefix_logits``). This times one pass of forward + backward (the update's cost per
optimiser pass) over the same recorded episodes each way, at several micro-batch sizes, and checks that
the log-probs and the gradient agree. The update computes logits only from a batch's first policy token
(``token_logprobs(needed=...)``, always on); the ways with logits for every position are the cost before that.

    python -m benchmarks.update_speed                 # SmolLM2-135M + LoRA r=8 on CPU, 8 ml-100k episodes
    python -m benchmarks.update_speed --device cuda --dtype bfloat16 --micro-batches 2,8,16 --episodes 16
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.common import markdown_table, publish, smoke_env_kwargs
from deeprec_env.cli import device_option
from deeprec_env.config import DTYPES
from deeprec_env.threads import thread_settings

WAYS = {
    "whole rows, all logits": (False, False),
    "whole rows": (False, True),
    "prefix once, all logits": (True, False),
    "prefix once": (True, True),
}
"""The forwards compared, ``(share_prefix, logits from the first policy token only)``; the first is the baseline of
the speed-ups and gaps. "whole rows" and "prefix once" are the update without and with ``share_prefix``."""


def _pass(model, trajectories: list, micro_batch: int, pad_id: int, share: bool,
          policy_logits: bool = True) -> tuple[float, int, list, float]:  # fmt: skip
    """One forward + backward over ``trajectories``: seconds, tokens through the model, policy log-probs, grad norm.

    ``policy_logits``: logits from the first policy token only, as the update (else every position's).
    """
    from agents.kv import KVBatch, shared_prefix_length
    from agents.rollout import pad_batch, token_logprobs

    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    total = sum(sum(t.policy_mask) for t in trajectories)
    tokens, logprobs = 0, []
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(0, len(trajectories), micro_batch):
        batch = {k: v.to(device) for k, v in pad_batch(trajectories[s : s + micro_batch], pad_id).items()}
        ids, mask = batch["input_ids"], batch["attention_mask"]
        lp = token_logprobs(model, ids, mask, share_prefix=share, needed=batch["loss_mask"] if policy_logits else None)
        (-(lp * batch["loss_mask"]).sum() / total).backward()
        shared = shared_prefix_length(ids, mask) if share else 0
        tokens += ids.numel() if shared < KVBatch.MIN_SHARED else shared + ids.shape[0] * (ids.shape[1] - shared)
        logprobs.append(lp.detach()[batch["loss_mask"].bool()].cpu())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    return seconds, tokens, logprobs, grad_norm


def measure(model, tokenizer, env_kwargs: dict, users: list[int], micro_batches: list[int], teacher: str) -> list[dict]:
    """Rows of the comparison: each micro-batch size, the four ways (:data:`WAYS`) on the same episodes.

    The episodes are transcripts of the scripted ``teacher`` recorded as the LLM policy's tokens
    (``agents.sft.demonstrations``): the update's cost depends on their lengths only.
    """
    from agents.sft import SFTArgs, demonstrations, make_teacher

    trajectories, _ = demonstrations(make_teacher(SFTArgs(teacher=teacher)), tokenizer, env_kwargs, users)
    if not trajectories:
        raise ValueError(f"the teacher {teacher!r} produced no well-formed episode")
    pad = tokenizer.pad_token_id
    mean_len = sum(len(t.ids) for t in trajectories) / len(trajectories)
    _pass(model, trajectories[: min(2, len(trajectories))], 2, pad, False)  # warm-up (allocator, kernels)
    rows = []
    for mb in micro_batches:
        plain = None
        for name, (share, policy_logits) in WAYS.items():
            seconds, tokens, logprobs, grad_norm = _pass(model, trajectories, mb, pad, share, policy_logits)
            row = {"micro-batch": mb, "forward": name, "episodes": len(trajectories), "tokens/episode": mean_len,
                   "tokens through the model": tokens, "seconds per pass": seconds,
                   "s/episode": seconds / len(trajectories), "grad norm": grad_norm}  # fmt: skip
            if plain is None:
                plain = (seconds, logprobs, grad_norm)
            else:
                gap = max(float((a - b).abs().max()) for a, b in zip(plain[1], logprobs, strict=True))
                row["speed-up"] = f"{plain[0] / seconds:.2f}x"
                row["max log-prob gap"] = f"{gap:.1e}"
                row["grad norm gap"] = f"{abs(plain[2] - grad_norm) / max(plain[2], 1e-12):.1e}"
            rows.append(row)
            print(row, flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--encoder", default="minilm", help="the environment's text encoder")
    ap.add_argument("--device", type=device_option, default="cpu")
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    ap.add_argument("--lora-r", type=int, default=8, help="LoRA rank (0: full fine-tuning)")
    ap.add_argument("--episodes", type=int, default=8, help="recorded episodes (ml-100k training users)")
    ap.add_argument(
        "--micro-batches",
        default="2,4",
        help="micro-batch sizes, comma-separated (8 rows of every "
        "position's logits, 'whole rows, all logits', were killed for memory on a 24 GiB machine)",
    )
    ap.add_argument("--teacher", default="history-top-category-unseen", help="scripted agent whose episodes are used")
    ap.add_argument("--prompt-history", type=int, default=5)
    ap.add_argument("--retrieval-k", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="synthetic data (pass a tiny --model and --encoder)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    try:
        micro = [int(x) for x in args.micro_batches.split(",")]
    except ValueError:
        ap.error(f"--micro-batches {args.micro_batches!r}; must be integers separated by commas")
    if min(micro) < 1 or args.episodes < 1 or args.lora_r < 0:
        ap.error("--micro-batches and --episodes must be >= 1, --lora-r >= 0")
    from agents.llm import add_lora, load_causal_lm
    from deeprec_env.env import EnvConfig, episode_split, get_resources

    model, tok = load_causal_lm(args.model, device=args.device, dtype=args.dtype, trainable_adapter=True)
    if args.lora_r:
        model = add_lora(model, args.lora_r)
    model.train()
    env_kwargs = {**(smoke_env_kwargs(args.encoder) if args.smoke else {"encoder": args.encoder}),
                  "prompt": "chat", "split": "train", "stage": "rec", "prompt_history": args.prompt_history,
                  "retrieval_k": args.retrieval_k}  # fmt: skip
    config = EnvConfig(**env_kwargs)
    users = [int(u) for u in episode_split(config, get_resources(config).dataset).users[: args.episodes]]
    load = os.getloadavg()[0]
    rows = measure(model, tok, env_kwargs, users, micro, args.teacher)
    protocol = {
        "model": f"{args.model}" + (f" + LoRA r={args.lora_r} on every linear layer" if args.lora_r else ", full"),
        "device": f"{args.device}, {args.dtype}",
        "episodes": f"{len(users)} {config.dataset} training users (the first of the split), {args.teacher} "
        f"transcripts as the LLM policy's tokens; chat prompt, last {args.prompt_history} history items, "
        f"top-{args.retrieval_k} per call",
        "timed": "one pass of forward + backward of the policy-token log-likelihood over every episode, "
        "micro-batched (the update's cost per optimiser pass), after one warm-up pass; the ways on the same "
        "episodes, one after the other; 'all logits': every position projected onto the vocabulary, otherwise "
        "positions from the batch's first policy token only (what the update does)",
        "gaps": "max |log-prob difference| over policy tokens and relative gradient-norm difference to "
        "'whole rows, all logits' (float rounding)",
        "load": f"1-minute load average {load:.2f} at start on {os.cpu_count()} cores (a shared machine)",
        "threads": f"torch {thread_settings()['torch threads (process)']}",
    }
    columns = list(dict.fromkeys(k for r in rows for k in r))
    publish("update_speed", "Policy-update speed: the shared prompt prefix run once, logits for policy tokens only",
            markdown_table(rows, columns,
            fmt="{:.2f}"), protocol, {"rows": rows}, args.smoke, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
