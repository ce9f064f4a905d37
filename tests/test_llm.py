import numpy as np
import pytest

from agents.base import run_episodes
from agents.llm import LLMPolicy, Trajectory


@pytest.fixture(scope="module")
def policy(tiny_lm_path):
    return LLMPolicy(str(tiny_lm_path), max_new_tokens=24)


def test_loads_local_model_and_plays(policy, make_env):
    envs = [make_env() for _ in range(3)]
    records = run_episodes(policy, envs, [{"example": i} for i in range(3)])
    assert len(records) == 3 and all(r.tokens > 0 for r in records)
    assert all(r.rank == -1 for r in records)  # a random model does not answer well-formed


def test_missing_local_model_is_a_clear_error(tmp_path, monkeypatch):
    from agents.llm import load_causal_lm

    monkeypatch.chdir(tmp_path)
    for path in (str(tmp_path / "nope"), "./nope", "~/no/such/model", "runs/no-run/checkpoint"):
        with pytest.raises(FileNotFoundError, match="no such folder"):
            load_causal_lm(path)


def test_model_path_under_home_is_expanded(tiny_lm_path, monkeypatch):
    from agents.llm import load_causal_lm

    monkeypatch.setenv("HOME", str(tiny_lm_path.parent))
    model, _ = load_causal_lm("~/" + tiny_lm_path.name)
    assert model.config.vocab_size > 0


def test_policy_mask_marks_exactly_the_env_tokens(policy, make_env, monkeypatch):
    env = make_env()
    obs, info = env.reset(options={"example": 0})
    state = policy.start(env, obs, info)
    prompt_ids = list(state["traj"].ids)
    call = "I see dramas. <|begin_of_preference|> drama <|end_of_preference|>"
    call_ids = policy.tokenizer(call, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(policy, "kv_cache", False)  # the path through generate (tests/test_kv.py: the same marks)
    monkeypatch.setattr(policy, "generate", lambda ctx, stops: [(call_ids, [-0.5] * len(call_ids), call)])
    seg = policy.act_batch([state], [obs])[0]
    obs2, *_ = env.step(seg)
    policy.act_batch([state], [obs2])
    traj: Trajectory = state["traj"]
    env_ids = policy.tokenizer(obs2, add_special_tokens=False)["input_ids"]
    assert traj.ids == prompt_ids + call_ids + env_ids + call_ids
    assert traj.policy_mask == [0] * len(prompt_ids) + [1] * len(call_ids) + [0] * len(env_ids) + [1] * len(call_ids)
    inserted = [t for t, m in zip(traj.ids[traj.n_prompt :], traj.policy_mask[traj.n_prompt :], strict=True) if not m]
    assert policy.tokenizer.decode(inserted) == obs2
    assert all(lp == 0.0 for lp, m in zip(traj.logprobs, traj.policy_mask, strict=True) if not m)


def test_stop_cut(policy):
    text = "abc <|end_of_preference|> trailing words"
    ids = policy.tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = policy._stop_cut(ids, ("<|end_of_preference|>",))
    assert policy.tokenizer.decode(ids[:cut]).endswith("<|end_of_preference|>")
    assert policy._stop_cut(ids, ("</recommendation_list>",)) == len(ids)


def test_generation_returns_logprobs_and_is_seeded(tiny_lm_path):
    a = LLMPolicy(str(tiny_lm_path), max_new_tokens=12, temperature=1.0, seed=3)
    b = LLMPolicy(str(tiny_lm_path), max_new_tokens=12, temperature=1.0, seed=3)
    ctx = [a.tokenizer("The user likes drama.", add_special_tokens=False)["input_ids"]]
    ((ia, la, ta),) = a.generate(ctx, [("<|end_of_preference|>",)])
    ((ib, lb, tb),) = b.generate(ctx, [("<|end_of_preference|>",)])
    assert ia == ib and ta == tb and len(la) == len(ia)
    assert all(np.isfinite(la)) and all(x <= 0 for x in la)


def test_batched_greedy_equals_single(tiny_lm_path):
    pol = LLMPolicy(str(tiny_lm_path), max_new_tokens=8)
    ctxs = [pol.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("drama", "The user likes comedy a lot")]
    batched = pol.generate(ctxs, [("</s>",)] * 2)
    for c, (ids, _, _) in zip(ctxs, batched, strict=True):
        single, _, _ = pol.generate([c], [("</s>",)])[0]
        assert single == ids


def test_bad_arguments(tiny_lm_path):
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        LLMPolicy(str(tiny_lm_path), max_new_tokens=0)
    with pytest.raises(ValueError, match="dtype="):
        LLMPolicy(str(tiny_lm_path), dtype="int3")
    with pytest.raises(ValueError, match="tokenizer"):
        LLMPolicy(object())


@pytest.mark.slow
def test_embedded_smollm2_loads_caches_and_plays(make_env):
    import time

    import torch

    from agents.llm import load_causal_lm

    t = time.perf_counter()
    policy = LLMPolicy("smollm2", max_new_tokens=8)
    first = time.perf_counter() - t
    n_params = sum(p.numel() for p in policy.model.parameters())
    assert 130e6 < n_params < 140e6
    t = time.perf_counter()
    model, tok = load_causal_lm("smollm2")  # from the dequantised cache
    assert time.perf_counter() - t < first
    ids = torch.as_tensor([tok("Hello there", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, policy.model(ids).logits, atol=1e-4)
    assert tok.chat_template
    env = make_env(prompt="chat")
    records = run_episodes(policy, [env], [{"example": 0}])
    assert records[0].tokens > 0


def test_lora_initialisation_follows_its_seed_only(tiny_lm_path):
    pytest.importorskip("peft")
    import torch

    from agents.llm import add_lora, load_causal_lm

    def lora_a(seed: int, global_seed: int) -> list:
        model = load_causal_lm(str(tiny_lm_path))[0]
        torch.manual_seed(global_seed)  # the caller's generator: must not matter, and must be left as it was
        state = torch.get_rng_state()
        model = add_lora(model, 2, seed)
        assert torch.equal(state, torch.get_rng_state())
        return [p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n]

    a, b, c = lora_a(0, 1), lora_a(0, 2), lora_a(1, 1)
    assert a and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
