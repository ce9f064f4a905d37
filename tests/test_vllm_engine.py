"""The vLLM rollout engine, driven through the stand-in in tests/fake_vllm.py (vLLM needs a GPU build)."""

import importlib.util

import numpy as np
import pytest
import torch

from agents.llm import LLMPolicy, load_causal_lm, prompt_text


def _contexts(policy, make_env, n=3):
    envs = [make_env() for _ in range(n)]
    out = []
    for i, env in enumerate(envs):
        obs, info = env.reset(options={"example": i})
        out.append(policy._encode(prompt_text(policy.tokenizer, env, obs, info)))
    return out, [tuple(envs[0].config.protocol.stop_strings)] * n


def test_greedy_segments_match_transformers(fake_vllm, tiny_lm_path, make_env):
    from agents.vllm_engine import VLLMEngine

    hf = LLMPolicy(str(tiny_lm_path), max_new_tokens=10)
    engine = VLLMEngine(str(tiny_lm_path))
    ve = LLMPolicy(hf.model, hf.tokenizer, max_new_tokens=10, engine=engine)
    contexts, stops = _contexts(hf, make_env)
    a, b = hf.generate(contexts, stops), ve.generate(contexts, stops)
    assert [x[0] for x in a] == [x[0] for x in b] and [x[2] for x in a] == [x[2] for x in b]
    for (_, la, _), (_, lb, _) in zip(a, b, strict=True):
        np.testing.assert_allclose(la, lb, atol=1e-4)
    args = fake_vllm.ENGINES[0].engine_args
    assert args["dtype"] == "auto" and args["gpu_memory_utilization"] == 0.3


def test_segments_end_at_the_first_stop_string(fake_vllm, tiny_lm_path, make_env):
    from agents.vllm_engine import VLLMEngine

    pol = LLMPolicy(str(tiny_lm_path), max_new_tokens=40, engine=VLLMEngine(str(tiny_lm_path)), temperature=1.0)
    contexts, _ = _contexts(pol, make_env, n=4)
    stops = [("e",)] * 4  # a stop string the random model hits quickly, mid-token or not
    for ids, lps, text in pol.generate(contexts, stops):
        assert len(ids) == len(lps) and text == pol.tokenizer.decode(ids)
        if "e" in text:  # cut right after the token that completes the first stop string
            assert "e" not in pol.tokenizer.decode(ids[:-1])


def test_sampling_is_seeded_by_the_policy(fake_vllm, tiny_lm_path, make_env):
    from agents.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(tiny_lm_path))
    model, tok = load_causal_lm(str(tiny_lm_path))
    runs = []
    for seed in (3, 3, 4):
        pol = LLMPolicy(model, tok, max_new_tokens=12, temperature=1.0, seed=seed, engine=engine)
        contexts, stops = _contexts(pol, make_env)
        runs.append([x[0] for x in pol.generate(contexts, stops)])
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_lora_weights_are_merged_under_base_names(tiny_lm_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from agents.vllm_engine import hf_weights

    base, _ = load_causal_lm(str(tiny_lm_path))
    names = {n for n, _ in base.named_parameters()}
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    x = torch.tensor([[5, 6, 7]])
    before = lora(x).logits
    pushed = {n: t.clone() for n, t in hf_weights(lora)}
    torch.testing.assert_close(lora(x).logits, before)  # unmerged again afterwards (to rounding)
    assert names <= set(pushed) and all(".base_layer." not in n and "lora_" not in n for n in pushed)
    merged = lora.merge_and_unload()
    for n, p in merged.named_parameters():
        torch.testing.assert_close(pushed[n], p)
    assert any(not torch.equal(pushed[n], p) for n, p in load_causal_lm(str(tiny_lm_path))[0].named_parameters())


def test_bad_engine_arguments(fake_vllm, tiny_lm_path):
    from agents.vllm_engine import VLLMEngine

    with pytest.raises(ValueError, match="gpu_memory_utilization=0"):
        VLLMEngine(str(tiny_lm_path), gpu_memory_utilization=0)
    with pytest.raises(ValueError, match="dtype='int8'"):
        VLLMEngine(str(tiny_lm_path), dtype="int8")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_missing_vllm_is_a_clear_error(tiny_lm_path):
    from agents.vllm_engine import VLLMEngine

    with pytest.raises(ImportError, match="pip install vllm"):
        VLLMEngine(str(tiny_lm_path))


def test_engine_loads_an_adapters_base_model(tmp_path, tiny_lm_path):
    import json

    from agents.vllm_engine import engine_model_path

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_lm_path)}))
    assert engine_model_path(str(adapter)) == str(tiny_lm_path)
    assert engine_model_path("org/some-model") == "org/some-model"
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="names no base model"):
        engine_model_path(str(adapter))
