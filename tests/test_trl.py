"""The TRL adapter against the real TRL (GRPOTrainer, SFTTrainer) on a tiny model and the tiny env."""

import numpy as np
import pytest

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from agents.trl_adapter import (  # noqa: E402
    DeepRecRollout,
    demonstration_dataset,
    prompt_dataset,
    prompt_key,
    reward_functions,
)
from deeprec_env.env import EnvConfig  # noqa: E402
from deeprec_env.rewards import COMPONENTS  # noqa: E402

CPU_RUN = dict(report_to=[], save_strategy="no", use_cpu=True, seed=0, bf16=False)
"""TRL trainer arguments of a test: CPU, seeded, nothing saved or reported."""


@pytest.fixture
def stage_kwargs(env_kwargs, resources):
    return {**env_kwargs, "stage": "rec", "split": "test", "prompt": "chat", "prompt_history": 5, "retrieval_k": 10}


def test_prompt_dataset_names_each_user_once(stage_kwargs):
    ds = prompt_dataset(**stage_kwargs)
    assert set(ds.column_names) >= {"prompt", "user", "split", "stage"}
    assert len(set(ds["user"])) == len(ds) > 10
    assert ds[0]["prompt"][0]["role"] == "user"
    keys = [prompt_key(p) for p in ds["prompt"]]
    assert len(set(keys)) == len(keys)
    rollout = DeepRecRollout(stage_kwargs)
    assert [rollout.user_of(p) for p in ds["prompt"][:5]] == ds["user"][:5]
    with pytest.raises(ValueError, match="no episode of this environment opens with"):
        rollout.user_of([{"role": "user", "content": "something else"}])
    with pytest.raises(TypeError, match="chat messages"):
        prompt_key(3)
    sub = prompt_dataset(users=ds["user"][:3], **stage_kwargs)
    assert sub["user"] == ds["user"][:3]


def test_reward_functions_sum_to_the_return():
    for stage in ("coldstart", "rec"):
        funcs = reward_functions({"stage": stage})
        weights = EnvConfig(stage=stage).weights
        assert [f.__name__ for f in funcs] == [f"deeprec_{c}" for c in COMPONENTS if weights[c] != 0]
        comps = {c: float(i + 1) for i, c in enumerate(COMPONENTS)}
        total = sum(f(deeprec_components=[comps])[0] for f in funcs)
        assert total == pytest.approx(sum(weights[c] * comps[c] for c in COMPONENTS))
    with pytest.raises(ValueError, match="DeepRecRollout"):
        funcs[0](prompts=["x"], completions=["y"])


def _sft(tiny_lm_path, stage_kwargs, out):
    """A tiny warm start with TRL's SFTTrainer on the exported demonstrations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_lm_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    demos = demonstration_dataset(tok, stage_kwargs)
    assert set(demos.column_names) == {"input_ids", "assistant_masks", "user"}
    row = demos[0]
    assert len(row["input_ids"]) == len(row["assistant_masks"])
    assert 0 < sum(row["assistant_masks"]) < len(row["input_ids"])
    args = SFTConfig(str(out), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=4,
                     max_length=None, **CPU_RUN)  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=demos, processing_class=tok)
    trainer.train()
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    assert losses[-1] < losses[0]
    return trainer.model, tok


def generated_tokens(completions=None, env_mask=None, completion_ids=None, **_):
    """A test-only reward: the policy tokens of the episode (its completion's length)."""
    return [float(len(c)) for c in completion_ids]


def test_grpo_trainer_runs_two_steps_with_a_nonzero_gradient(tmp_path, tiny_lm_path, stage_kwargs):
    """TRL's GRPOTrainer with the adapter, after a tiny SFTTrainer warm start on the exported demonstrations.

    A tiny model still fails every episode alike (every DeepRec reward -1, so every advantage 0 and no
    gradient); a test-only reward on the completion's length gives the group members different
    advantages, so the update runs through the adapter's ids, masks and log-probs.
    """
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model, tok = _sft(tiny_lm_path, stage_kwargs, tmp_path / "sft")
    grads = []

    class GradNorm(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            grads.append(float(sum(p.grad.norm() ** 2 for p in model.parameters() if p.grad is not None) ** 0.5))

    rollout = DeepRecRollout(stage_kwargs, max_new_tokens=48)
    args = GRPOConfig(str(tmp_path / "grpo"), max_steps=2, per_device_train_batch_size=8, num_generations=4,
                      temperature=1.0, learning_rate=1e-3, logging_steps=1, **CPU_RUN)  # fmt: skip
    trainer = GRPOTrainer(
        model=model,
        args=args,
        processing_class=tok,
        train_dataset=prompt_dataset(**stage_kwargs),
        rollout_func=rollout,
        reward_funcs=[*reward_functions(stage_kwargs), generated_tokens],
        callbacks=[GradNorm()],
    )
    trainer.train()
    assert rollout.calls == 2 and len(grads) == 2
    assert max(grads) > 0
    logged = [x for x in trainer.state.log_history if "reward" in x]
    assert len(logged) == 2
    names = [f"rewards/deeprec_{c}/mean" for c in ("format", "hit", "rank", "point")]
    assert all(n in logged[0] for n in names), sorted(logged[0])


def test_rollout_output_is_what_trl_needs(tiny_lm_path, stage_kwargs):
    """Token bookkeeping of one rollout call: prompt + completion = the episode, env tokens masked, EOS at the end."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    ds = prompt_dataset(**stage_kwargs)
    rollout = DeepRecRollout(stage_kwargs, max_new_tokens=8)
    args = SimpleNamespace(temperature=1.0, top_p=1.0, seed=0)
    trainer = SimpleNamespace(model=model, processing_class=tok, args=args)
    out = rollout(ds["prompt"][:2] * 2, trainer)
    assert out["deeprec_user"] == ds["user"][:2] * 2
    for ids, lps, mask in zip(out["completion_ids"], out["logprobs"], out["env_mask"], strict=True):
        assert len(ids) == len(lps) == len(mask) > 0
        assert all(lp == 0.0 for lp, m in zip(lps, mask, strict=True) if m == 0)
        assert all(lp <= 0.0 for lp in lps)
    for comps, ret in zip(out["deeprec_components"], out["deeprec_return"], strict=True):
        w = EnvConfig(**stage_kwargs).weights
        assert sum(w[c] * v for c, v in comps.items()) == pytest.approx(ret)
    assert np.isfinite(out["deeprec_return"]).all()
