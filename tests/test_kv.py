"""The KV-cache rollout path gives the tokens, marks and log-probs of model.generate on the whole context."""

import pytest
import torch

from agents.base import play_episodes
from agents.llm import LLMPolicy, load_causal_lm


@pytest.fixture(scope="module")
def lm(tiny_lm_path):
    return load_causal_lm(str(tiny_lm_path))


def _play(lm, make_env, kv_cache: bool, temperature: float, n: int = 5, max_new_tokens: int = 12, varied=False):
    model, tok = lm
    policy = LLMPolicy(model, tok, max_new_tokens=max_new_tokens, temperature=temperature, seed=3,
                       kv_cache=kv_cache)  # fmt: skip
    # feedback mode: invalid segments get a message and the episode goes on (several turns per episode)
    limits = [1 + (i % 4 if varied else 2) for i in range(n)]
    envs = [make_env(prompt="chat", prompt_history=3, invalid_action="feedback", max_invalid=m) for m in limits]
    users = [int(u) for u in envs[0].split.users[:n]]
    records, states = play_episodes(policy, envs, [{"user": u} for u in users])
    return records, [s["traj"] for s in states]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_path_matches_generate(lm, make_env, temperature):
    _, plain = _play(lm, make_env, False, temperature)
    _, cached = _play(lm, make_env, True, temperature)
    assert sum(len(t.segments) for t in plain) > len(plain)  # several turns per episode
    for a, b in zip(plain, cached, strict=True):
        assert a.segments == b.segments
        assert a.ids == b.ids and a.policy_mask == b.policy_mask
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_kv_cache_batch_shrinks_as_episodes_end(lm, make_env):
    """Episodes of different lengths in one batch: rows leave the cache as their episodes end."""
    records, trajs = _play(lm, make_env, True, 1.0, n=6, max_new_tokens=20, varied=True)
    lengths = {len(t.segments) for t in trajs}
    assert len(lengths) > 1  # some episodes ended earlier than others
    _, plain = _play(lm, make_env, False, 1.0, n=6, max_new_tokens=20, varied=True)
    assert [t.ids for t in trajs] == [t.ids for t in plain]


def test_shared_prompt_prefix_runs_once(lm):
    """Rows that share a prompt prefix: the prefix runs once (a batch of one); the logits are each row's own."""
    from agents.kv import KVBatch
    from agents.llm import Trajectory

    model, tok = lm
    prefix = list(range(5, 5 + KVBatch.MIN_SHARED + 4))
    rows = [prefix + [40, 41, 42], prefix + [43], prefix + [44, 45]]
    trajs = []
    for ids in rows:
        t = Trajectory()
        t.extend(ids, policy=False)
        trajs.append(t)
    batch = KVBatch(model, tok.pad_token_id)
    batch.attach([{} for _ in trajs])
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)  # fmt: skip
    try:
        with torch.inference_mode():
            logits = batch.feed(trajs)
    finally:
        hook.remove()
    assert shapes == [(1, len(prefix)), (3, 3)]
    with torch.inference_mode():
        for r, ids in enumerate(rows):
            alone = model(input_ids=torch.tensor([ids])).logits[0, -1]
            assert torch.allclose(logits[r], alone, atol=1e-4)


def _grads(model, lp, mask):
    model.zero_grad(set_to_none=True)
    (lp * mask).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.7, "top_k": 5}])
def test_shared_prefix_log_probs_and_gradients_match_the_full_batch(tiny_lm_path, sampling):
    """The training forward with the prompt prefix run once: same log-probs and gradients as the whole batch."""
    from agents.kv import KVBatch
    from agents.llm import Trajectory, add_lora
    from agents.rollout import pad_batch, token_logprobs

    model, tok = load_causal_lm(str(tiny_lm_path))
    model = add_lora(model, r=2)
    prefix = list(range(5, 5 + KVBatch.MIN_SHARED + 4))
    trajs = []
    for tail in ([40, 41, 42, 43], [44], [45, 46]):  # right-padded to different lengths
        t = Trajectory()
        t.extend(prefix, policy=False)
        t.extend(tail, policy=True)
        trajs.append(t)
    batch = pad_batch(trajs, tok.pad_token_id)
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)  # fmt: skip
    try:
        shared = token_logprobs(model, batch["input_ids"], batch["attention_mask"], share_prefix=True, **sampling)
    finally:
        hook.remove()
    assert shapes == [(1, len(prefix)), (3, 4)]  # the prefix ran once
    full = token_logprobs(model, batch["input_ids"], batch["attention_mask"], **sampling)
    real = batch["attention_mask"].bool()
    assert torch.allclose(shared[real], full[real], atol=1e-5)
    assert (shared[:, len(prefix) :][real[:, len(prefix) :]] < 0).all()  # the rows' own tokens have log-probs
    a, b = _grads(model, shared, batch["loss_mask"]), _grads(model, full, batch["loss_mask"])
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("share_prefix", [False, True])
@pytest.mark.parametrize("first", [3, 24, 25, 30])  # inside the shared prefix (24 tokens), at its end, after it
def test_logits_only_from_the_first_needed_column(tiny_lm_path, share_prefix, first):
    """``needed``: no vocabulary projection before the batch's first needed column; the needed log-probs and
    their gradients are those of the full computation, the columns before come back 0."""
    from agents.kv import KVBatch
    from agents.llm import Trajectory, add_lora
    from agents.rollout import pad_batch, token_logprobs

    model, tok = load_causal_lm(str(tiny_lm_path))
    model = add_lora(model, r=2)
    prefix = list(range(5, 5 + KVBatch.MIN_SHARED + 8))
    trajs = []
    for tail in (list(range(40, 52)), list(range(60, 70)), [70]):
        t = Trajectory()
        t.extend(prefix + tail[:1], policy=False)
        t.extend(tail[1:], policy=True)
        trajs.append(t)
    batch = pad_batch(trajs, tok.pad_token_id)
    needed = batch["loss_mask"].clone()
    needed[0, first] = 1  # the batch's first needed column
    needed[:, :first] = 0
    widths = []
    hook = model.get_base_model().lm_head.register_forward_hook(lambda m, a, out: widths.append(out.shape[1]))
    sampling = {"temperature": 0.7}  # top-k would give these arbitrary tokens -inf
    try:
        lp = token_logprobs(model, batch["input_ids"], batch["attention_mask"], share_prefix=share_prefix,
                            needed=needed, **sampling)  # fmt: skip
    finally:
        hook.remove()
    width = batch["input_ids"].shape[1]
    if not share_prefix:
        assert widths == [width - first + 1]
    elif first >= len(prefix):  # the prefix is context only: its last column's logits, then the rows' from first - 1
        assert widths == [1, min(width - first + 1, width - len(prefix))]
    else:
        assert widths == [len(prefix), width - len(prefix)]
    full = token_logprobs(model, batch["input_ids"], batch["attention_mask"], **sampling)
    on = needed.bool()
    assert torch.allclose(lp[on], full[on], atol=1e-5) and (lp[on] < 0).all()
    assert (lp[:, :first] == 0).all() and torch.isfinite(lp[on]).all()
    a, b = _grads(model, lp, needed), _grads(model, full, needed)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name
    with pytest.raises(ValueError, match="needed has shape"):
        token_logprobs(model, batch["input_ids"], batch["attention_mask"], needed=needed[:, 1:])


def test_shared_prefix_falls_back_when_rows_differ_early(lm):
    """No shared prefix worth a pass of its own (or one row): the batch runs in one forward."""
    from agents.kv import shared_prefix_length
    from agents.rollout import token_logprobs

    model, _ = lm
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert shared_prefix_length(ids, mask) == 2
    assert shared_prefix_length(ids[:1], mask[:1]) == 0
    assert shared_prefix_length(torch.tensor([[5, 6], [5, 6]]), torch.ones(2, 2, dtype=torch.long)) == 1  # keeps one
    with torch.no_grad():
        a = token_logprobs(model, ids, mask, share_prefix=True)
        b = token_logprobs(model, ids, mask)
    assert torch.equal(a, b)
