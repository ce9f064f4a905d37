"""Policy-update memory: the peak resident memory of one forward + backward pass, by rows x tokens.

Each shape runs in a fresh process (the peak of a process only grows): the model is loaded, its resident memory
read, then one pass of the loss's forward and backward (``agents.rollout.token_logprobs`` at the CPU run's
sampling temperature) runs on random token ids of that shape. What it tells: how many token positions one pass
of the update may hold on a machine, the number to give ``GRPOArgs.micro_batch_tokens``.

A shape ``ROWSxTOKENS@LAST`` says the loss reads the last ``LAST`` tokens of each row only, as the update does (its
logits start at the first policy token: ``token_logprobs(needed=...)``); without ``@LAST`` every position's logits
are computed (the update before that change). Every shape runs without and with gradient checkpointing
(``GRPOArgs.gradient_checkpointing``: each layer's activations recomputed in the backward pass), unless
``--checkpointing`` picks one.

    python -m benchmarks.update_memory                               # SmolLM2-135M + LoRA r=8, CPU
    python -m benchmarks.update_memory --shapes 2x1100,2x1100@420,1x4400 --lora-r 0
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
from unittest.mock import patch

from benchmarks.common import markdown_table, publish


def _peak_rss_gib() -> float:
    """This process's peak resident memory so far, in GiB."""
    from agents.runs import memory_gib  # in the measured process, after its own imports

    return memory_gib()["peak_rss_gib"]


def _one(model_name: str, lora_r: int, rows: int, tokens: int, last: int, checkpointing: bool, temperature: float,
         queue) -> None:  # fmt: skip
    import time

    import torch

    from agents.llm import add_lora, enable_gradient_checkpointing, load_causal_lm
    from agents.rollout import token_logprobs

    model, tok = load_causal_lm(model_name, trainable_adapter=True)
    if lora_r:
        model = add_lora(model, lora_r)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    loaded = _peak_rss_gib()
    ids = torch.randint(0, len(tok), (rows, tokens), generator=torch.Generator().manual_seed(0))
    needed = torch.zeros_like(ids)
    needed[:, tokens - (last or tokens) :] = 1
    t0 = time.perf_counter()
    lp = token_logprobs(model, ids, torch.ones_like(ids), temperature=temperature, needed=needed if last else None)
    (lp * needed).sum().backward()
    queue.put((loaded, _peak_rss_gib(), time.perf_counter() - t0))


MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
"""glibc allocator settings of the measuring processes: every block of 64 KiB or more is mapped on its own and
returned to the system when freed, so the peak resident memory follows the memory in use. With glibc's defaults
(an adaptive threshold, freed blocks kept in the heap) the same 2 x 1,100 pass peaked anywhere from 4.6 to 6.9 GiB
from run to run on this CPU, more than the difference this benchmark measures."""


def measure(model: str, lora_r: int, shapes: list[tuple[int, int, int]], temperature: float = 0.7,
            checkpointing: tuple[bool, ...] = (False, True)) -> list[dict]:  # fmt: skip
    """One row per ``(rows, tokens, last)`` shape and checkpointing setting: memory and seconds of the pass.

    Resident memory after loading and at the pass's peak; the pass's wall-clock seconds.

    ``last``: the loss reads the last ``last`` tokens of each row (0: all, every position's logits computed).
    """
    ctx = mp.get_context("spawn")  # a fresh process per shape, torch's threads not inherited
    out = []
    with patch.dict(os.environ, MALLOC):  # the children's allocator (spawned processes take this environment)
        for (rows, tokens, last), recompute in ((shape, c) for shape in shapes for c in checkpointing):
            queue = ctx.Queue()
            proc = ctx.Process(target=_one, args=(model, lora_r, rows, tokens, last, recompute, temperature, queue))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                raise RuntimeError(f"the {rows}x{tokens} pass failed (exit code {proc.exitcode}; killed for memory?)")
            loaded, peak, seconds = queue.get()
            positions = rows * tokens
            out.append({"rows": rows, "tokens": tokens, "positions": positions,
                        "logits per row": f"last {last}" if last else "all",
                        "checkpointing": "on" if recompute else "off", "GiB after loading": loaded,
                        "GiB peak": peak, "GiB per 1,000 positions": (peak - loaded) / positions * 1000,
                        "seconds": seconds})  # fmt: skip
            print(out[-1], flush=True)
    return out


def _shape(text: str) -> tuple[int, int, int]:
    rows, _, rest = text.partition("x")
    tokens, at, last = rest.partition("@")
    try:
        shape = int(rows), int(tokens), int(last) if at else 0
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}; a shape is ROWSxTOKENS[@LAST]: 2x1100, 2x1100@420") from None
    if min(shape[:2]) < 1 or shape[1] < 2:
        raise argparse.ArgumentTypeError(f"{text!r}; needs >= 1 row and >= 2 tokens")
    if at and not 1 <= shape[2] < shape[1]:
        raise argparse.ArgumentTypeError(f"{text!r}; LAST must be >= 1 and below TOKENS")
    return shape


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lora-r", type=int, default=8, help="LoRA rank (0: full fine-tuning)")
    ap.add_argument(
        "--shapes",
        default="2x1100,2x1100@420,2x2200,2x2200@840,1x4400",
        help="ROWSxTOKENS[@LAST] passes, comma-separated (@LAST: logits for each row's last LAST tokens)",
    )
    ap.add_argument(
        "--checkpointing",
        choices=("both", "off", "on"),
        default="both",
        help="gradient checkpointing of the passes: each shape without and with it (default), or one",
    )
    ap.add_argument("--smoke", action="store_true", help="label the results a smoke run (pass a tiny --model)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    try:
        shapes = [_shape(s) for s in args.shapes.split(",")] if args.shapes else []
    except argparse.ArgumentTypeError as e:
        ap.error(f"--shapes: {e}")
    if not shapes or args.lora_r < 0:
        ap.error("--shapes needs at least one ROWSxTOKENS[@LAST]; --lora-r must be >= 0")
    checkpointing = {"both": (False, True), "off": (False,), "on": (True,)}[args.checkpointing]
    rows = measure(args.model, args.lora_r, shapes, checkpointing=checkpointing)
    protocol = {
        "model": args.model + (f" + LoRA r={args.lora_r} on every linear layer" if args.lora_r else ", full"),
        "device": "cpu, float32",
        "pass": "one forward + backward of the token log-probs (temperature 0.7) on random token ids of each shape, "
        "no padding, share_prefix off, gradient checkpointing off or on (transformers', non-reentrant: each layer's "
        "activations recomputed in the backward pass); logits for every position ('all') or for each row's last LAST "
        "tokens (as the update: from its first policy token; a chat episode of ~1,100 tokens has its first policy "
        "token near 700)",
        "memory": "peak resident set size of a fresh process per shape (ru_maxrss), after loading the model and "
        "after the pass; per 1,000 positions = (peak - after loading) / positions; allocator: "
        + " ".join(f"{k}={v}" for k, v in MALLOC.items())
        + " (blocks of 64 KiB or more returned when freed: the peak follows the memory in use)",
        "seconds": "the pass's forward + backward, wall clock, one run (under that allocator, on a shared machine)",
        "load": f"1-minute load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores",
    }
    columns = list(rows[0])
    publish("update_memory", "Policy-update memory per pass", markdown_table(rows, columns, fmt="{:.2f}"), protocol,
            {"rows": rows}, args.smoke, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
