"""One RL training step at real model shapes: seconds, peak memory, episodes, and the paper-scale projection.

Random weights at the shapes of SmolLM2-135M, SmolLM2-1.7B and a 7B model (Qwen2.5-7B's dimensions in
Llama blocks), full fine-tuning and LoRA: each run times one ``agents.grpo`` step (grouped multi-turn
rollouts with the KV cache, then the update) on the embedded ml-100k environment, and projects the paper's
100 steps x 1,024 episodes from the measured seconds per episode. Random weights rarely call the TRM, so
episodes are short: the projection is a lower bound on rollout time and exact for the update's shapes.

    python -m benchmarks.train_step_gpu --device cuda --dtype bfloat16              # every shape, full + LoRA
    python -m benchmarks.train_step_gpu --shapes 135m --modes full --tokenizer DIR  # a folder of tokenizer files
    python -m benchmarks.train_step_gpu --smoke                                     # tiny shapes on the CPU
    python -m benchmarks.train_step_gpu --share-prefix ...   # the update runs the shared prompt prefix once
    python -m benchmarks.train_step_gpu --shapes 7b --modes full+ckpt,lora+ckpt  # with gradient checkpointing

A mode is ``full`` or ``lora``, with ``+ckpt`` for gradient checkpointing in the update
(``GRPOArgs.gradient_checkpointing``; not with ``--share-prefix``). A step that runs out of accelerator memory
is a row saying so, and the other shapes still run.

Not run on a GPU by the session that wrote it (none was lent): its figures are still to be measured.
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np
import torch

from agents.llm import check_checkpointing
from benchmarks.common import environment, markdown_table, protocol_text, smoke_env_kwargs, write_results
from deeprec_env.cli import positive_int, require_device
from deeprec_env.config import DTYPES

SHAPES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152),
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=49152),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=512),
}  # fmt: skip
"""Llama configurations at the shapes measured (``tiny`` is for ``--smoke``)."""


def random_model(shape: str, tokenizer, device: str, dtype: str):
    """A randomly initialised Llama at ``shape`` whose vocabulary covers ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(SHAPES[shape])
    dims["vocab_size"] = max(dims["vocab_size"], len(tokenizer))
    config = LlamaConfig(**dims, max_position_embeddings=8192, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    return model


MODES = ("full", "lora", "full+ckpt", "lora+ckpt")
"""Fine-tuning modes: every weight or a LoRA adapter, each without or with gradient checkpointing."""


def _mode_name(mode: str, lora_r: int) -> str:
    base, _, ckpt = mode.partition("+")
    return ("full" if base == "full" else f"LoRA r={lora_r}") + (", checkpointing" if ckpt else "")


def one_step(shape: str, mode: str, tokenizer, args, env_kwargs: dict) -> dict:
    """Time one training step (rollouts + update) of ``shape`` with ``mode`` (one of :data:`MODES`).

    Out of accelerator memory, the row says so (``"out of memory"`` in its ``note``) instead of ending the run.
    """
    try:
        return _one_step(shape, mode, tokenizer, args, env_kwargs)
    except torch.OutOfMemoryError as e:
        message = str(e)[:120]
    gc.collect()  # the failed step's tensors went with the exception's frames: hand their memory back
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    row = {"shape": shape, "mode": _mode_name(mode, args.lora_r), "note": f"out of memory: {message}"}
    print(row, flush=True)
    return row


def _one_step(shape: str, mode: str, tokenizer, args, env_kwargs: dict) -> dict:
    from agents.grpo import GRPOArgs, compute_advantages, train_step
    from agents.llm import LLMPolicy, enable_gradient_checkpointing
    from agents.rollout import collect_rollouts, group_rewards
    from deeprec_env.env import DeepRecEnv, EnvConfig, get_resources

    checkpointing = mode.endswith("+ckpt")
    gargs = GRPOArgs(users_per_step=args.users, group_size=args.group_size, micro_batch=args.micro_batch,
                     max_new_tokens=args.max_new_tokens, mini_batches=2, prompt="chat",
                     share_prefix=args.share_prefix, gradient_checkpointing=checkpointing)  # fmt: skip
    model = random_model(shape, tokenizer, args.device, args.dtype)
    if mode.startswith("lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, task_type="CAUSAL_LM"))
    if checkpointing:
        enable_gradient_checkpointing(model)
    env_kwargs = gargs.env_kwargs("rec", env_kwargs)
    resources = get_resources(EnvConfig(**env_kwargs))
    envs = [DeepRecEnv(resources=resources, **env_kwargs) for _ in range(args.users * args.group_size)]
    users = [int(u) for u in envs[0].split.users[: args.users]]
    policy = LLMPolicy(model, tokenizer, max_new_tokens=args.max_new_tokens, temperature=1.0, name=shape)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    rollouts = collect_rollouts(policy, envs, users, args.group_size)
    t1 = time.perf_counter()
    adv = compute_advantages(group_rewards(rollouts, args.group_size)).reshape(-1)
    adv = adv if np.any(adv) else np.tile([1.0, -1.0], len(adv) // 2 + 1)[: len(adv)]  # random weights: all fail
    stats = train_step(model, optimizer, rollouts, adv, gargs, tokenizer.pad_token_id, rng=np.random.default_rng(0))
    if cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    episodes = len(rollouts)
    per_episode = (t2 - t0) / episodes
    row = {
        "shape": shape,
        "mode": _mode_name(mode, args.lora_r),
        "episodes/step": episodes,
        "rollout s": t1 - t0,
        "update s": t2 - t1,
        "step s": t2 - t0,
        "peak GB": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "tokens/episode": float(np.mean([len(r.trajectory.ids) for r in rollouts])),
        "policy tokens": stats["policy_tokens"],
        "paper scale (100 x 1,024 episodes), h": per_episode * 1024 * 100 / 3600,
        "note": "",
    }
    print(row, flush=True)
    del model, optimizer, policy
    if cuda:
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="135m,1.7b,7b")
    ap.add_argument("--modes", default="full,lora", help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    ap.add_argument("--users", type=positive_int, default=8, help="users per step")
    ap.add_argument("--group-size", type=positive_int, default=8)
    ap.add_argument("--micro-batch", type=positive_int, default=8)
    ap.add_argument("--max-new-tokens", type=positive_int, default=128)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--share-prefix", action="store_true", help="the update runs the shared prompt prefix once")
    ap.add_argument("--tokenizer", default="smollm2", help="'smollm2' (embedded) or a folder of tokenizer files")
    ap.add_argument("--encoder", default="minilm", help="the environment's text encoder")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (seconds)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    if any(m not in MODES for m in modes):
        ap.error(f"--modes {args.modes!r}; each must be one of {', '.join(MODES)}")
    try:  # the trainer's own rule: no gradient checkpointing with share_prefix
        check_checkpointing(argparse.Namespace(gradient_checkpointing=any(m.endswith("+ckpt") for m in modes),
                                               share_prefix=args.share_prefix))  # fmt: skip
    except ValueError as e:
        ap.error(f"a +ckpt mode: {e}")
    from transformers import AutoTokenizer

    env_kwargs: dict = {"encoder": args.encoder}
    if args.smoke:
        env_kwargs = smoke_env_kwargs(args.encoder)
        args.shapes, args.device, args.dtype, args.users, args.group_size, args.max_new_tokens = (
            "tiny", "cpu", "float32", 2, 2, 8)  # fmt: skip
    require_device(ap, args.device)  # before any model is built (--smoke runs on the CPU whatever it says)
    if args.tokenizer == "smollm2":
        from agents.llm import smollm2_folder

        args.tokenizer = str(smollm2_folder())
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = [one_step(shape, mode, tokenizer, args, env_kwargs)
            for shape in args.shapes.split(",") for mode in modes]  # fmt: skip
    protocol = {
        "models": "random weights at the listed shapes (Llama blocks), tokenizer " + args.tokenizer,
        "device": f"{args.device}, {args.dtype}",
        "step": f"{args.users} users x {args.group_size} samples, rollouts with the KV cache, then two optimiser "
        f"steps (mini_batches=2), micro-batch {args.micro_batch}, {args.max_new_tokens} new tokens per segment"
        + (", the shared prompt prefix run once in the update (share_prefix)" if args.share_prefix else ""),
        "env": "DeepRec-v0 stage rec, chat prompt, " + ("synthetic (smoke)" if args.smoke else "ml-100k"),
        "projection": "measured seconds per episode x 1,024 episodes x 100 steps (random weights end episodes "
        "early: a lower bound on rollouts)",
    }
    columns = max((list(r) for r in rows), key=len)  # an out-of-memory row has only its shape, mode and note
    text = f"## One training step at real shapes\n\n{markdown_table(rows, columns, fmt='{:.2f}')}\n\nProtocol:\n"
    text += protocol_text(protocol) + "\n"
    print(text)
    if not args.smoke or args.out:
        payload = {"benchmark": "train_step_gpu", "protocol": protocol, **environment(), "rows": rows}
        write_results("train_step_gpu" + ("_smoke" if args.smoke else ""), payload, text, args.out)


if __name__ == "__main__":
    main()
