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
