"""On-policy RL: the loss uses the distribution the rollouts were sampled from; several updates per batch."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from agents.grpo import GRPOArgs, _old_logprobs, train_step
from agents.llm import LLMPolicy, load_causal_lm
from agents.rollout import collect_rollouts, pad_batch, token_logprobs


@pytest.fixture
def lm(tiny_lm_path):
    torch.manual_seed(0)
    return load_causal_lm(str(tiny_lm_path))


def _rollouts(lm, make_env, temperature=1.0, top_k=0, top_p=1.0, users=2, group=2):
    model, tok = lm
    policy = LLMPolicy(model, tok, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=8, seed=1)
    envs = [make_env(prompt="chat", prompt_history=3, retrieval_k=3) for _ in range(users * group)]
    us = [int(u) for u in envs[0].split.users[:users]]
    return collect_rollouts(policy, envs, us, group)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (0.9, 0, 0.8)]
)
def test_recorded_logprobs_are_those_of_the_sampling_distribution(lm, make_env, temperature, top_k, top_p):
    model, tok = lm
    rollouts = _rollouts(lm, make_env, temperature, top_k, top_p)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    old = _old_logprobs(model, rollouts, GRPOArgs(micro_batch=2), tok.pad_token_id, sampling)
    n = 0
    for r, lp in zip(rollouts, old, strict=True):
        t = r.trajectory
        mask = torch.as_tensor(t.policy_mask, dtype=torch.bool)
        recorded = torch.as_tensor(t.logprobs)[mask]
        assert torch.allclose(lp[mask], recorded, atol=2e-4), (lp[mask] - recorded).abs().max()
        n += int(mask.sum())
    assert n > 0
    if top_k == 0 and top_p == 1.0:  # transformers' own default (top-k 50 of a 400-token vocabulary) is off
        full = [token_logprobs(model, *_batch(r, tok)) for r in rollouts]
        for r, f in zip(rollouts, full, strict=True):
            mask = torch.as_tensor(r.trajectory.policy_mask, dtype=torch.bool)
            scaled = token_logprobs(model, *_batch(r, tok), temperature=temperature)[0][mask]
            assert torch.allclose(scaled, torch.as_tensor(r.trajectory.logprobs)[mask], atol=2e-4)
            assert f.shape[1] == len(r.trajectory.ids)


def _batch(r, tok):
    b = pad_batch([r.trajectory], tok.pad_token_id)
    return b["input_ids"], b["attention_mask"]


def _twin(lm, make_env, tiny_lm_path):
    """``(model, tok, other, rollouts, advantages)``: ``other`` a second copy of the model with the same weights."""
    model, tok = lm
    other, _ = load_causal_lm(str(tiny_lm_path))
    other.load_state_dict(model.state_dict())
    return model, tok, other, _rollouts(lm, make_env), np.array([1.0, -1.0, 0.5, -0.5])


def _args(**kw):
    return GRPOArgs(micro_batch=2, lr=5e-2, temperature=1.0, **kw)


def test_one_update_per_batch_has_ratio_one_and_no_clipping(lm, make_env):
    model, tok = lm
    rollouts = _rollouts(lm, make_env)
    adv = np.array([1.0, -1.0, 0.5, -0.5])
    stats = train_step(model, torch.optim.Adam(model.parameters(), lr=5e-2), rollouts, adv, _args(), tok.pad_token_id)
    assert stats["updates"] == 1 and stats["clip_fraction"] == 0.0
    assert stats["sampler_gap"] < 1e-4  # the loss's distribution is the sampler's
    assert stats["grad_norm"] > 0


def test_one_update_equals_the_detached_old_logprob_update(lm, make_env, tiny_lm_path):
    """mini_batches=1, ppo_epochs=1 is the plain policy gradient; precomputed old log-probs give the same step."""
    model, tok, other, rollouts, adv = _twin(lm, make_env, tiny_lm_path)
    train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), rollouts, adv, _args(), tok.pad_token_id)
    # the same update with old log-probs precomputed (the multi-update path), forced on a single update
    args = _args(mini_batches=2)
    old = _old_logprobs(
        other, rollouts, GRPOArgs(micro_batch=2), tok.pad_token_id, {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    )
    import agents.grpo as grpo

    stats = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "grad_norm": 0.0, "sampler_gap": 0.0, "tokens": 0}
    grpo._optimiser_step(other, torch.optim.SGD(other.parameters(), lr=0.1), rollouts, adv, [0, 1, 2, 3], old,
                         replace(args, mini_batches=1), tok.pad_token_id,
                         {"temperature": 1.0, "top_k": 0, "top_p": 1.0}, stats, None, None)  # fmt: skip
    for (name, a), b in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_the_clip_binds_when_ratios_move(lm, make_env):
    model, tok = lm
    rollouts = _rollouts(lm, make_env)
    adv = np.array([1.0, -1.0, 1.0, -1.0])
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    stats = train_step(model, opt, rollouts, adv, _args(ppo_epochs=3, mini_batches=2), tok.pad_token_id,
                       rng=np.random.default_rng(0))  # fmt: skip
    assert stats["updates"] == 6
    assert stats["clip_fraction"] > 0.0  # later updates move the ratio past 1 - 0.2 or 1 + 0.28


def _mean_policy_logprob(model, rollouts, pad_id) -> np.ndarray:
    """Per trajectory, the mean log-prob of its policy tokens under ``model`` (temperature 1)."""
    batch = pad_batch([r.trajectory for r in rollouts], pad_id)
    with torch.no_grad():
        lp = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
    mask = batch["loss_mask"]
    return ((lp * mask).sum(1) / mask.sum(1)).numpy()


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_the_update_moves_log_probs_the_way_of_the_advantages(lm, make_env, mini_batches):
    """The sign of the whole recipe: a small step makes the positive-advantage samples more likely and the negative
    ones less (first order: sum_i A_i dlogp_i = lr |g|^2 > 0), whatever the micro-batching."""
    model, tok = lm
    rollouts = _rollouts(lm, make_env)
    adv = np.array([1.0, -1.0, 1.0, -1.0])
    before = _mean_policy_logprob(model, rollouts, tok.pad_token_id)
    train_step(model, torch.optim.SGD(model.parameters(), lr=1e-2), rollouts, adv,
               _args(mini_batches=mini_batches), tok.pad_token_id, rng=np.random.default_rng(0))  # fmt: skip
    change = _mean_policy_logprob(model, rollouts, tok.pad_token_id) - before
    assert float(adv @ change) > 0
    assert change[adv > 0].mean() > 0 > change[adv < 0].mean()


def test_top_k_training_stays_finite(lm, make_env, tiny_lm_path):
    """With top-k, prompt and inserted tokens outside the top k have log-prob -inf: the update must not turn the
    masked ``-inf - -inf`` into NaN (loss, statistics, weights), with the reference policy's KL too."""
    model, tok = lm
    rollouts = _rollouts(lm, make_env, temperature=1.0, top_k=5)
    adv = np.array([1.0, -1.0, 0.5, -0.5])
    ref = load_causal_lm(str(tiny_lm_path))[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_step(model, opt, rollouts, adv, _args(top_k=5, mini_batches=2, kl_coef=0.1), tok.pad_token_id,
                       ref_model=ref, rng=np.random.default_rng(0))  # fmt: skip
    for key in ("loss", "grad_norm", "clip_fraction", "sampler_gap", "kl"):
        assert np.isfinite(stats[key]), key
    assert stats["sampler_gap"] < 1e-3 and stats["kl"] != 0.0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sampling_settings_are_checked():
    with pytest.raises(ValueError, match="top_k=-1"):
        GRPOArgs(top_k=-1)
    with pytest.raises(ValueError, match="temperature=0"):
        GRPOArgs(temperature=0.0)
    with pytest.raises(ValueError, match="mini_batches=0"):
        GRPOArgs(mini_batches=0)


def test_shared_prefix_training_step_equals_the_plain_one(lm, make_env, tiny_lm_path):
    """``share_prefix``: the prompt's common instructions run once per micro-batch; the update is the same."""
    model, tok, other, rollouts, adv = _twin(lm, make_env, tiny_lm_path)
    args = _args(mini_batches=2, ppo_epochs=2)
    plain = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), rollouts, adv, args, tok.pad_token_id,
                       rng=np.random.default_rng(0))  # fmt: skip
    rows = []
    hook = other.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        sgd = torch.optim.SGD(other.parameters(), lr=0.1)
        shared = train_step(other, sgd, rollouts, adv, replace(args, share_prefix=True), tok.pad_token_id,
                            rng=np.random.default_rng(0))  # fmt: skip
    finally:
        hook.remove()
    assert rows.count(1) == len(rows) // 2 > 0  # every micro-batch of 2: its shared prefix as a batch of one first
    for key in ("loss", "grad_norm", "clip_fraction", "sampler_gap"):
        assert plain[key] == pytest.approx(shared[key], rel=1e-4, abs=1e-6), key
    for (name, a), b in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name


@given(lengths=st.lists(st.integers(1, 50), min_size=0, max_size=12), size=st.integers(1, 5),
       max_tokens=st.integers(0, 120))  # fmt: skip
def test_micro_batches_keep_order_size_and_token_bound(lengths, size, max_tokens):
    from agents.grpo import micro_batches

    parts = micro_batches(lengths, size, max_tokens)
    assert [i for p in parts for i in p] == list(range(len(lengths)))  # every trajectory once, in order
    for p in parts:
        assert 1 <= len(p) <= size
        if len(p) > 1 and max_tokens:
            assert len(p) * max(lengths[i] for i in p) <= max_tokens
    if not max_tokens:  # no bound: today's fixed-size chunks
        assert parts == [list(range(s, min(s + size, len(lengths)))) for s in range(0, len(lengths), size)]


def test_token_bound_cuts_passes_and_keeps_the_update(lm, make_env, tiny_lm_path):
    """``micro_batch_tokens``: smaller forward/backward passes, the same optimiser step."""
    model, tok, other, rollouts, adv = _twin(lm, make_env, tiny_lm_path)
    args = replace(_args(mini_batches=2, ppo_epochs=2), micro_batch=4)
    train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), rollouts, adv, args, tok.pad_token_id,
               rng=np.random.default_rng(0))  # fmt: skip
    bound = max(len(r.trajectory.ids) for r in rollouts)  # one trajectory per pass
    sizes = []
    hook = other.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].numel()), with_kwargs=True)
    try:
        sgd = torch.optim.SGD(other.parameters(), lr=0.1)
        train_step(other, sgd, rollouts, adv, replace(args, micro_batch_tokens=bound), tok.pad_token_id,
                   rng=np.random.default_rng(0))  # fmt: skip
    finally:
        hook.remove()
    assert len(sizes) == 4 * 3 and max(sizes) <= bound  # old log-probs (4 passes) + 2 x 2 updates of 2 passes each
    for (name, a), b in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
    with pytest.raises(ValueError, match="micro_batch_tokens=-1"):
        GRPOArgs(micro_batch_tokens=-1)


def _lora_policy(start: str, seed: int):
    """A LoRA policy from ``start`` (a model or an adapter folder) whose adapter has moved away from it."""
    from agents.llm import add_lora

    policy = add_lora(load_causal_lm(start, trainable_adapter=True)[0], 4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return policy


@pytest.mark.parametrize("from_adapter", [False, True])
def test_a_lora_policys_kl_reference_shares_its_base_weights(tmp_path, tiny_lm_path, make_env, from_adapter):
    """``AdapterReference``: the stage's start (the base model, or a LoRA warm start loaded as a frozen second
    adapter) on the policy's own weights gives a separate copy's log-probs, restores the policy afterwards, and
    trains the same KL-penalised step."""
    pytest.importorskip("peft")
    from agents.llm import AdapterReference, reference_model
    from agents.runs import save_checkpoint

    start = str(tiny_lm_path)
    if from_adapter:
        warm = _lora_policy(start, seed=1)
        warm.save_pretrained(tmp_path / "warm", save_embedding_layers=False)
        start = str(tmp_path / "warm")
    policy, tok = _lora_policy(start, seed=2), load_causal_lm(start)[1]
    params = dict(policy.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    policy.train()
    reference = AdapterReference(policy, start)
    added = {n for n, _ in policy.named_parameters()} - params.keys()
    assert all("lora_" in n and ".reference." in n for n in added) and bool(added) == from_adapter  # no base copy
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable and policy.training
    separate = load_causal_lm(start)[0]  # what the trainer loads without the shared reference (merged)
    ids = torch.randint(3, 50, (2, 24), generator=torch.Generator().manual_seed(0))
    att = torch.ones_like(ids)
    with torch.no_grad():
        own = token_logprobs(policy, ids, att, temperature=0.7)
        with reference_model(reference) as m:
            assert not m.training
            shared = token_logprobs(m, ids, att, temperature=0.7)
        torch.testing.assert_close(shared, token_logprobs(separate, ids, att, temperature=0.7), rtol=0, atol=1e-5)
        assert (own - shared).abs().max() > 1e-2  # the policy is not its reference
        assert torch.equal(token_logprobs(policy, ids, att, temperature=0.7), own)  # restored
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable and policy.training
    # one KL-penalised training step each way: the same statistics and weights
    rollouts = _rollouts((policy, tok), make_env)
    adv = np.array([1.0, -1.0, 0.5, -0.5])
    twin = _lora_policy(start, seed=2)
    twin.train()
    args = _args(mini_batches=2, kl_coef=0.5)
    steps = []
    for model, ref in ((policy, reference), (twin, separate)):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        steps.append(train_step(model, opt, rollouts, adv, args, tok.pad_token_id, ref_model=ref,
                                rng=np.random.default_rng(0)))  # fmt: skip
    assert steps[0]["kl"] > 0 and steps[0]["kl"] == pytest.approx(steps[1]["kl"], rel=1e-4)
    assert steps[0]["loss"] == pytest.approx(steps[1]["loss"], rel=1e-4, abs=1e-6)
    for (name, a), b in zip(twin.named_parameters(), (p for n, p in policy.named_parameters() if n in params),
                            strict=True):  # fmt: skip
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
    # a checkpoint holds the trained adapter only, not the reference's frozen copy
    save_checkpoint(tmp_path / "ckpt", policy, tok, opt, 0, args)
    assert not (tmp_path / "ckpt" / "reference").exists()
    with torch.no_grad():
        reloaded = token_logprobs(load_causal_lm(str(tmp_path / "ckpt"))[0], ids, att, temperature=0.7)
        torch.testing.assert_close(reloaded, token_logprobs(policy, ids, att, temperature=0.7), rtol=0, atol=1e-5)


def test_adapter_reference_refuses_what_it_cannot_share(tmp_path, tiny_lm_path):
    pytest.importorskip("peft")
    from agents.llm import AdapterReference

    with pytest.raises(ValueError, match="no peft adapter"):
        AdapterReference(load_causal_lm(str(tiny_lm_path))[0], str(tiny_lm_path))
    other = _lora_policy(str(tiny_lm_path), seed=1)
    other.peft_config["default"].base_model_name_or_path = "some/other-model"
    other.save_pretrained(tmp_path / "other", save_embedding_layers=False)
    with pytest.raises(ValueError, match="adapter of 'some/other-model'"):
        AdapterReference(_lora_policy(str(tiny_lm_path), seed=2), str(tmp_path / "other"))


@given(runs=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=0, max_size=6))
def test_last_segment_only_keeps_the_last_generated_run(runs):
    from agents.llm import Trajectory
    from agents.rollout import last_segment_only

    t = Trajectory(n_prompt=3)
    t.extend([1, 2, 3], policy=False)
    for i, (context, generated) in enumerate(runs):  # an inserted item list, then a generated segment
        t.extend([10 + i] * context, policy=False)
        t.extend([20 + i] * generated, policy=True, logprobs=[-0.5 - i] * generated)
    last = last_segment_only(t)
    assert last.ids == t.ids and last.n_prompt == 3 and t.policy_mask != [] and len(last.logprobs) == len(t.ids)
    kept = [i for i, m in enumerate(last.policy_mask) if m]
    generated = [i for i, m in enumerate(t.policy_mask) if m]
    if generated:  # one contiguous run, ending at the last generated token, that nothing generated precedes directly
        assert kept and kept == list(range(kept[0], generated[-1] + 1)) and set(kept) <= set(generated)
        assert kept[0] == 0 or not t.policy_mask[kept[0] - 1]
    else:
        assert kept == []
    assert all(lp == (t.logprobs[i] if i in kept else 0.0) for i, lp in enumerate(last.logprobs))


def test_answer_only_training_leaves_the_calls_out_of_the_loss(lm, make_env, tiny_lm_path):
    """``train_segments="answer"``: the same step as training on trajectories whose earlier segments are context."""
    from agents.rollout import last_segment_only

    model, tok, other, rollouts, adv = _twin(lm, make_env, tiny_lm_path)
    # the tiny model answers at once; give each episode an earlier generated segment (a call) inside its prompt
    for r in rollouts:
        t, n = r.trajectory, r.trajectory.n_prompt
        t.policy_mask[n - 6 : n - 3] = [1, 1, 1]
        t.logprobs[n - 6 : n - 3] = [-1.0, -1.0, -1.0]
    args = _args(mini_batches=2, train_segments="answer")
    stats = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), rollouts, adv, args, tok.pad_token_id,
                       rng=np.random.default_rng(0))  # fmt: skip
    cut = [replace(r, trajectory=last_segment_only(r.trajectory)) for r in rollouts]
    everything = replace(args, train_segments="all")
    by_hand = train_step(other, torch.optim.SGD(other.parameters(), lr=0.1), cut, adv, everything, tok.pad_token_id,
                         rng=np.random.default_rng(0))  # fmt: skip
    assert stats == by_hand
    assert stats["policy_tokens"] < sum(sum(r.trajectory.policy_mask) for r in rollouts)
    for (name, a), b in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b), name
