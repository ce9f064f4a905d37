"""A stand-in for the parts of vLLM's Python API that ``agents.vllm_engine`` uses (vLLM 0.33).

Not vLLM: a token-by-token sampler over a transformers model, with vLLM's calling conventions
(``LLM(model=..., **engine_args)``, ``generate`` on ``{"prompt_token_ids": ...}`` prompts with one
``SamplingParams`` per prompt, outputs with ``token_ids`` and per-position ``{token: Logprob}``
dicts, stop strings that end generation and stay in the output, EOS kept in ``token_ids``,
``apply_model(fn)`` returning one result per worker, and a model whose ``load_weights`` takes
``(checkpoint name, tensor)`` pairs and rejects unknown names). The tests install it as ``vllm``.
Anything it does not implement raises instead of being ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ENGINES: list[LLM] = []
"""Every engine built (the tests inspect them)."""


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int | None = 16
    stop: list[str] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    seed: int | None = None


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    text: str = ""


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


class _Model:
    """What ``apply_model`` hands to a function: the model, with vLLM's ``load_weights`` contract."""

    def __init__(self, hf):
        self.hf = hf

    def load_weights(self, weights) -> set[str]:
        params = dict(self.hf.named_parameters())
        loaded = set()
        with torch.no_grad():
            for name, tensor in weights:
                if name not in params:
                    raise KeyError(f"unknown weight {name!r}")
                params[name].copy_(tensor)
                loaded.add(name)
        return loaded


class LLM:
    def __init__(self, model: str, **engine_args):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.engine_args = engine_args
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = _Model(AutoModelForCausalLM.from_pretrained(model).eval())
        self.weight_pushes = 0
        self.prefix_resets = 0
        self.requests = 0
        ENGINES.append(self)

    def generate(self, prompts, sampling_params, *, use_tqdm=True) -> list[RequestOutput]:
        if not isinstance(sampling_params, list) or len(sampling_params) != len(prompts):
            raise NotImplementedError("the stand-in takes one SamplingParams per prompt")
        self.requests += len(prompts)
        return [self._one(p["prompt_token_ids"], sp) for p, sp in zip(prompts, sampling_params, strict=True)]

    def _one(self, prompt: list[int], sp: SamplingParams) -> RequestOutput:
        if (
            sp.top_p != 1.0
            or sp.top_k not in (-1, 0)
            or not sp.include_stop_str_in_output
            or sp.logprobs not in (None, 0)
        ):
            raise NotImplementedError(f"stand-in: unsupported sampling params {sp}")
        gen = torch.Generator().manual_seed(sp.seed if sp.seed is not None else 0)
        ids, lps = [], []
        eos = self.tokenizer.eos_token_id
        with torch.no_grad():
            for _ in range(sp.max_tokens):
                logits = self.model.hf(torch.tensor([prompt + ids])).logits[0, -1].float()
                logp = torch.log_softmax(logits, -1)
                if sp.temperature == 0:
                    tok = int(logits.argmax())
                else:
                    tok = int(torch.multinomial(torch.softmax(logits / sp.temperature, -1), 1, generator=gen))
                ids.append(tok)
                lps.append({tok: Logprob(float(logp[tok]))})
                if tok == eos:
                    break
                text = self.tokenizer.decode(ids, skip_special_tokens=sp.skip_special_tokens)
                if any(s in text for s in sp.stop or []):
                    break
        out = CompletionOutput(ids, lps if sp.logprobs is not None else None)
        return RequestOutput(list(prompt), [out])

    def apply_model(self, fn):
        self.weight_pushes += 1
        return [fn(self.model)]

    def reset_prefix_cache(self) -> bool:
        self.prefix_resets += 1
        return True
