import json
from dataclasses import replace

import numpy as np
import pytest

from agents.sft import SFTArgs, demonstrations, make_teacher, train_sft


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_recorded_mask_covers_exactly_the_agent_segments(tiny_lm_path, env_kwargs, resources):
    from agents.baselines import HistoryFacetPolicy

    tok = _tok(tiny_lm_path)
    kwargs = {**env_kwargs, "prompt": "chat", "split": "train", "stage": "rec"}
    trajs, recs = demonstrations(HistoryFacetPolicy(n_calls=2), tok, kwargs, [0, 1, 2])
    assert len(trajs) == 3 and all(r.calls == 2 for r in recs)
    for t in trajs:
        ids, mask = np.array(t.ids), np.array(t.policy_mask)
        assert mask[: t.n_prompt].sum() == 0
        # the masked-in runs, decoded, are the agent's segments in order; everything else is prompt or env
        runs = np.split(np.arange(len(ids)), np.flatnonzero(np.diff(mask)) + 1)
        policy_runs = [tok.decode(ids[r].tolist()) for r in runs if mask[r[0]]]
        assert policy_runs == t.segments
        assert len(t.segments) == 3  # two calls and the answer
        env_runs = [tok.decode(ids[r].tolist()) for r in runs[1:] if not mask[r[0]]]
        assert all(x.lstrip().startswith("<|begin_of_item_list|>") for x in env_runs)


def test_sft_loss_with_the_shared_prompt_prefix_run_once(tiny_lm_path, env_kwargs, resources):
    import torch

    from agents.llm import load_causal_lm
    from agents.rollout import pad_batch
    from agents.sft import sft_loss

    model, tok = load_causal_lm(str(tiny_lm_path))
    kwargs = {**env_kwargs, "prompt": "chat", "split": "train", "stage": "rec"}
    trajs, _ = demonstrations(make_teacher(SFTArgs()), tok, kwargs, [0, 1, 2])
    batch = pad_batch(trajs, tok.pad_token_id)
    from agents.kv import KVBatch, shared_prefix_length

    assert shared_prefix_length(batch["input_ids"], batch["attention_mask"]) >= KVBatch.MIN_SHARED  # a prefix to share
    with torch.no_grad():
        plain, n = sft_loss(model, batch)
        shared, m = sft_loss(model, batch, share_prefix=True)
    assert n == m > 0 and float(shared) == pytest.approx(float(plain), rel=1e-5)


def test_teacher_draws_its_call_counts(tiny_lm_path, env_kwargs, resources):
    tok = _tok(tiny_lm_path)
    kwargs = {**env_kwargs, "prompt": "chat", "split": "train", "stage": "rec"}
    teacher = make_teacher(SFTArgs(teacher_calls=(1, 3)))
    _, recs = demonstrations(teacher, tok, kwargs, list(range(12)))
    assert {r.calls for r in recs} == {1, 3}


def test_hint_mix_teacher(tiny_lm_path, env_kwargs, resources):
    from agents.baselines import HintMixPolicy

    teacher = make_teacher(SFTArgs(teacher="hint-mix", teacher_hint_share=1.0))
    assert isinstance(teacher, HintMixPolicy) and teacher.share == 1.0
    kwargs = {**env_kwargs, "prompt": "chat", "split": "train", "stage": "rec", "target_hint": True}
    _, recs = demonstrations(teacher, _tok(tiny_lm_path), kwargs, list(range(4)))
    cats = resources.dataset.catalog.categories
    assert recs and all(r.preferences == ["; ".join(cats[r.target])] for r in recs)
    with pytest.raises(ValueError, match="teacher_hint_share=-0.1"):
        SFTArgs(teacher_hint_share=-0.1)


def test_unseen_mix_teacher():
    from agents.baselines import UnseenMixPolicy

    teacher = make_teacher(SFTArgs(teacher="unseen-mix", teacher_unseen_share=0.75, seed=3))
    assert isinstance(teacher, UnseenMixPolicy) and teacher.share == 0.75
    with pytest.raises(ValueError, match="teacher_unseen_share=nan"):
        SFTArgs(teacher_unseen_share=float("nan"))
    with pytest.raises(ValueError, match="unseen-mix"):  # the error lists every teacher, when the settings are built
        SFTArgs(teacher="no-such-agent")


def test_sft_fits_the_demonstrations_and_is_reused(tmp_path, tiny_lm_path, env_kwargs, resources):
    from agents.llm import load_causal_lm

    args = SFTArgs(model=str(tiny_lm_path), episodes=4, epochs=6, batch=4, micro_batch=2, lr=3e-2,
                   prompt_history=5, out=str(tmp_path))  # fmt: skip
    ckpt = train_sft(args, env_kwargs, progress=False)
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and all(np.isfinite(r["loss"]) for r in log)
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["done"] and state["demonstrations"] == 4
    load_causal_lm(str(ckpt))
    mtime = (ckpt / "trainer_state.json").stat().st_mtime_ns
    assert train_sft(args, env_kwargs, progress=False) == ckpt  # finished: reused, not retrained
    assert train_sft(replace(args, micro_batch=1), env_kwargs, progress=False) == ckpt  # a free setting
    assert (ckpt / "trainer_state.json").stat().st_mtime_ns == mtime
    for changed in ({"epochs": 2}, {"teacher": "history-describer"}, {"lr": 1e-3, "seed": 1}):
        with pytest.raises(ValueError, match=f"started with {next(iter(changed))}="):  # not the old warm start
            train_sft(replace(args, **changed), env_kwargs, progress=False)
    assert (ckpt / "trainer_state.json").stat().st_mtime_ns == mtime


def test_bad_sft_args():
    with pytest.raises(ValueError, match="episodes=0"):
        SFTArgs(episodes=0)
    with pytest.raises(ValueError, match="reads the target"):
        SFTArgs(teacher="oracle-preference")
    with pytest.raises(ValueError, match="teacher='nope'"):
        SFTArgs(teacher="nope")


def test_cli_parses_number_tuples():
    import argparse

    from deeprec_env.cli import add_dataclass_args, from_args

    ap = argparse.ArgumentParser()
    add_dataclass_args(ap, SFTArgs)
    args = from_args(SFTArgs, ap.parse_args(["--teacher-calls", "1,3", "--betas", "0.8,0.9"]))
    assert args.teacher_calls == (1, 3) and args.betas == (0.8, 0.9)
    with pytest.raises(SystemExit):
        ap.parse_args(["--teacher-calls", "a,b"])


def test_curriculum_cli_rejects_bad_warm_start_calls(capsys):
    from agents import curriculum

    with pytest.raises(SystemExit):
        curriculum.main(["--warm-start", "history-facet", "--warm-start-calls", "1,x"])
    assert "expected integers separated by commas" in capsys.readouterr().err


def test_curriculum_starts_stage1_from_the_warm_start(tmp_path, tiny_lm_path, env_kwargs, resources):
    from agents.curriculum import run_curriculum
    from agents.grpo import GRPOArgs

    base = GRPOArgs(model=str(tiny_lm_path), users_per_step=1, group_size=2, max_new_tokens=6, micro_batch=1,
                    rollout_batch=2, val_users=0, out=str(tmp_path), prompt_history=5)  # fmt: skip
    warm = SFTArgs(episodes=2, epochs=1, batch=2)
    run_curriculum(base, coldstart_steps=1, rec_steps=1, env_kwargs=env_kwargs, warm_start=warm, progress=False)
    stage1 = json.loads((tmp_path / "coldstart" / "checkpoint" / "trainer_state.json").read_text())
    assert stage1["args"]["model"] == str(tmp_path / "warmstart" / "checkpoint")
    sft = json.loads((tmp_path / "warmstart" / "checkpoint" / "trainer_state.json").read_text())
    assert sft["args"]["model"] == str(tiny_lm_path) and sft["args"]["prompt_history"] == 5


def test_lora_warm_start_then_stage_2_continue_one_adapter(tmp_path, tiny_lm_path, env_kwargs, resources):
    """A LoRA warm start saves an adapter only; stage 2 (stage 1 skipped) trains that same adapter further."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from agents.curriculum import run_curriculum
    from agents.grpo import GRPOArgs

    base = GRPOArgs(model=str(tiny_lm_path), users_per_step=1, group_size=2, max_new_tokens=6, micro_batch=1,
                    rollout_batch=2, val_users=0, out=str(tmp_path), prompt_history=5, lora_r=2,
                    temperature=1.5)  # fmt: skip
    warm = SFTArgs(episodes=2, epochs=1, batch=2, lr=1e-2, lora_r=2)
    final = run_curriculum(base, coldstart_steps=0, rec_steps=1, env_kwargs=env_kwargs, warm_start=warm,
                           progress=False)  # fmt: skip
    assert not (tmp_path / "coldstart").exists() and final == tmp_path / "rec" / "checkpoint"
    sft = tmp_path / "warmstart" / "checkpoint"
    assert {p.name for p in sft.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert not (sft / "model.safetensors").exists()  # the adapter only
    before, after = load_file(sft / "adapter_model.safetensors"), load_file(final / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all("lora_" in k for k in before)
    assert any("mlp" in k for k in before)  # every linear layer, not only the attention's
    stage2 = json.loads((final / "trainer_state.json").read_text())
    assert stage2["args"]["model"] == str(sft)
    with pytest.raises(ValueError, match="coldstart_steps"):
        run_curriculum(base, coldstart_steps=-1, rec_steps=1, env_kwargs=env_kwargs)
