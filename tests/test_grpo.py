import json
import sys
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from agents.grpo import GRPOArgs, compute_advantages, policy_loss, train
from agents.llm import Trajectory
from agents.rollout import pad_batch


def test_group_advantage_and_whitening_by_hand():
    r = np.array([[1.0, 3.0], [0.0, 0.0]])
    assert compute_advantages(r, "none").tolist() == [[-1.0, 1.0], [0.0, 0.0]]
    sd = np.sqrt(0.5)  # std of [-1, 1, 0, 0]
    assert np.allclose(compute_advantages(r, "divide"), [[-1 / sd, 1 / sd], [0, 0]], atol=1e-6)
    assert np.allclose(compute_advantages(r, "multiply"), [[-sd, sd], [0, 0]])
    same = compute_advantages(np.ones((3, 4)), "divide")
    assert np.allclose(same, 0)  # no signal: no update, no division by zero


def test_policy_loss_clips_asymmetrically():
    mask = torch.ones(1, 1)
    old = torch.zeros(1, 1)
    up = torch.log(torch.tensor([[2.0]]))
    assert policy_loss(up, old, torch.tensor([1.0]), mask).item() == pytest.approx(-1.28)
    down = torch.log(torch.tensor([[0.5]]))
    assert policy_loss(down, old, torch.tensor([-1.0]), mask).item() == pytest.approx(0.8)
    assert policy_loss(old, old, torch.tensor([2.0]), mask).item() == pytest.approx(-2.0)
    # masked tokens do not count
    two = torch.tensor([[0.0, 5.0]])
    assert policy_loss(two, torch.zeros(1, 2), torch.tensor([1.0]), torch.tensor([[1.0, 0.0]])).item() == -1.0


def test_pad_batch_mask_is_the_policy_mask():
    t = Trajectory()
    t.extend([5, 6, 7], policy=False)
    t.extend([8, 9], policy=True, logprobs=[-1.0, -2.0])
    t.extend([10], policy=False)
    u = Trajectory()
    u.extend([1], policy=True)
    b = pad_batch([t, u], pad_id=0)
    assert b["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0]]
    assert b["attention_mask"][1].tolist() == [1, 0, 0, 0, 0, 0]


def _args(tmp_path, path, **kw):
    base = dict(
        model=str(path),
        steps=1,
        users_per_step=1,
        group_size=2,
        max_new_tokens=6,
        micro_batch=1,
        rollout_batch=2,
        val_users=0,
        prompt="chat",
        out=str(tmp_path),
        lr=1e-3,
    )
    return GRPOArgs(**{**base, **kw})


@pytest.fixture
def varied_advantages(monkeypatch):
    """A random tiny model fails every episode alike (reward -1, advantage 0, no update). To exercise the
    update itself, give the group members opposite advantages; compute_advantages is tested above."""
    import agents.grpo as grpo

    monkeypatch.setattr(
        grpo, "compute_advantages", lambda r, whiten: np.tile([1.0, -1.0], r.size // 2).reshape(r.shape)
    )


@pytest.mark.parametrize("stage", ["coldstart", "rec"])
def test_one_step_per_stage_changes_weights(tmp_path, tiny_lm_path, env_kwargs, resources, stage, varied_advantages):
    from agents.llm import load_causal_lm

    before, _ = load_causal_lm(str(tiny_lm_path))
    ckpt = train(_args(tmp_path, tiny_lm_path, stage=stage, temperature=1.5), env_kwargs, progress=False)
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and np.isfinite(log[0]["loss"]) and log[0]["policy_tokens"] > 0
    # every episode failed alike: no group carries a signal (the advantages above are patched in)
    assert log[0]["signal_groups"] == 0.0 and log[0]["signal_groups_format"] == 0.0
    # the step's time and its two parts, sampling then the update, which it contains
    assert 0.0 < log[0]["rollout_seconds"] and 0.0 < log[0]["update_seconds"]
    assert log[0]["rollout_seconds"] + log[0]["update_seconds"] <= log[0]["seconds"]
    if sys.platform == "linux":  # the process's memory: resident at the step's end, at most its peak so far
        assert 0.0 < log[0]["rss_gib"] <= log[0]["peak_rss_gib"] + 1e-3
    after, _ = load_causal_lm(str(ckpt))
    changed = [not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters(), strict=True)]
    assert any(changed)
    assert (tmp_path / "curves.png").is_file()


def test_resume_reproduces_the_next_step(tmp_path, tiny_lm_path, env_kwargs, resources, varied_advantages):
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    train(_args(a_dir, tiny_lm_path, steps=2), env_kwargs, progress=False)
    train(_args(b_dir, tiny_lm_path, steps=1), env_kwargs, progress=False)  # "killed" after step 0
    train(_args(b_dir, tiny_lm_path, steps=2), env_kwargs, progress=False)  # resumed
    la = [json.loads(x) for x in (a_dir / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (b_dir / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lb] == [0, 1]
    with pytest.raises(ValueError, match="after 2 steps, more than steps=1"):  # not the step-2 checkpoint as step 1's
        train(_args(b_dir, tiny_lm_path, steps=1), env_kwargs, progress=False)
    with pytest.raises(ValueError, match=r"started with lr=.* \(now 0\.5\)"):  # not continued with another lr
        train(_args(b_dir, tiny_lm_path, steps=3, lr=0.5), env_kwargs, progress=False)
    assert la[1]["grad_norm"] > 0.0  # opposite advantages: the loss value may be 0, its gradient is not
    for key in ("reward", "loss", "grad_norm", "policy_tokens"):
        assert la[1][key] == pytest.approx(lb[1][key], rel=1e-5, abs=1e-7)


def test_bad_args():
    with pytest.raises(ValueError, match="group_size=0"):
        GRPOArgs(group_size=0)
    with pytest.raises(ValueError, match="whiten='sqrt'"):
        GRPOArgs(whiten="sqrt")
    with pytest.raises(ValueError, match="rollout_engine='sglang'"):
        GRPOArgs(rollout_engine="sglang")
    with pytest.raises(ValueError, match="vllm_gpu_memory=1.5"):
        GRPOArgs(vllm_gpu_memory=1.5)
    with pytest.raises(ValueError, match="train_users=-1"):
        GRPOArgs(train_users=-1)


def test_train_users_keeps_the_first_of_the_stage_half(env_kwargs, resources):
    from agents.grpo import training_users
    from deeprec_env.env import DeepRecEnv

    env = DeepRecEnv(resources=resources, **GRPOArgs(stage="rec").env_kwargs("rec", env_kwargs))
    for half in ("first-half", "second-half"):
        pool = training_users(env, GRPOArgs(users=half))
        assert len(pool) > 3
        assert training_users(env, GRPOArgs(users=half, train_users=3)).tolist() == pool[:3].tolist()
        assert training_users(env, GRPOArgs(users=half, train_users=10**6)).tolist() == pool.tolist()


def test_vllm_rollouts_get_the_weights_after_every_step(tmp_path, tiny_lm_path, env_kwargs, resources,
                                                        varied_advantages, fake_vllm):  # fmt: skip
    """rollout_engine='vllm' through the stand-in (tests/fake_vllm.py): rollouts come from the engine, and
    the engine holds the trainer's weights at every step."""
    from agents.llm import load_causal_lm

    ckpt = train(_args(tmp_path, tiny_lm_path, steps=2, temperature=1.5, rollout_engine="vllm"), env_kwargs,
                 progress=False)  # fmt: skip
    (engine,) = fake_vllm.ENGINES
    assert engine.requests > 0 and engine.engine_args["seed"] == 0
    assert engine.weight_pushes == engine.prefix_resets == 3  # on loading, then after each of the 2 steps
    served = dict(engine.model.hf.named_parameters())
    trained, _ = load_causal_lm(str(ckpt))
    for name, p in trained.named_parameters():
        assert torch.equal(p, served[name]), name
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [0, 1] and all(np.isfinite(x["loss"]) and x["policy_tokens"] > 0 for x in log)


def test_curriculum_runs_both_stages_from_the_stage1_checkpoint(tmp_path, tiny_lm_path, env_kwargs, resources):
    from agents.curriculum import run_curriculum

    base = _args(tmp_path, tiny_lm_path)
    final = run_curriculum(base, coldstart_steps=1, rec_steps=1, env_kwargs=env_kwargs, progress=False)
    assert final == tmp_path / "rec" / "checkpoint"
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["args"]["model"] == str(tmp_path / "coldstart" / "checkpoint") and state["args"]["stage"] == "rec"
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["coldstart", "rec"]
    assert (tmp_path / "curves.png").is_file()


def test_curriculum_cli_parses(tmp_path):
    import argparse

    from deeprec_env.cli import add_dataclass_args, from_args

    ap = argparse.ArgumentParser()
    add_dataclass_args(ap, GRPOArgs, skip=("stage",))
    args = from_args(GRPOArgs, ap.parse_args(["--lr", "0.5", "--whiten", "multiply"]), defaults_for=("stage",))
    assert args.lr == 0.5 and args.whiten == "multiply" and args.betas == (0.9, 0.95)


def test_lora_trains_the_adapter_only_and_resumes(tmp_path, tiny_lm_path, env_kwargs, resources, varied_advantages):
    pytest.importorskip("peft")
    from agents.llm import load_causal_lm

    base, _ = load_causal_lm(str(tiny_lm_path))
    ckpt = train(_args(tmp_path, tiny_lm_path, lora_r=4, temperature=1.5), env_kwargs, progress=False)
    assert (ckpt / "adapter_config.json").is_file() and not (ckpt / "model.safetensors").exists()
    merged, _ = load_causal_lm(str(ckpt))  # base + adapter, merged
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), merged.parameters(), strict=True))
    trainable, _ = load_causal_lm(str(ckpt), trainable_adapter=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    train(_args(tmp_path, tiny_lm_path, lora_r=4, temperature=1.5, steps=2), env_kwargs, progress=False)  # resume
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [0, 1]


def test_lora_kl_run_keeps_no_second_base_model(tmp_path, tiny_lm_path, env_kwargs, resources, varied_advantages,
                                               monkeypatch):  # fmt: skip
    """``kl_reference="adapter"`` from a LoRA warm start: the trainer loads the base model once, penalises the
    drift from the warm start, and checkpoints the trained adapter alone (and resumes with it)."""
    pytest.importorskip("peft")
    import agents.llm as llm

    warm = train(_args(tmp_path / "warm", tiny_lm_path, lora_r=4, temperature=1.5), env_kwargs, progress=False)
    loads = []
    real = llm.load_causal_lm
    monkeypatch.setattr(llm, "load_causal_lm", lambda *a, **kw: loads.append(a) or real(*a, **kw))
    args = _args(tmp_path / "kl", warm, kl_coef=0.5, kl_reference="adapter", group_size=4, mini_batches=2,
                 temperature=1.5)  # fmt: skip
    ckpt = train(args, env_kwargs, progress=False)
    log = json.loads((tmp_path / "kl" / "log.jsonl").read_text())
    assert log["kl"] > 0  # the second optimiser step: the policy has moved from the warm start
    assert sum(llm.adapter_base(str(a[0])) is None for a in loads) == 1  # the policy's base only, no reference copy
    assert (ckpt / "adapter_config.json").is_file() and not (ckpt / "reference").exists()
    train(replace(args, steps=2), env_kwargs, progress=False)  # resume: the reference is the warm start again
    assert [json.loads(x)["step"] for x in (tmp_path / "kl" / "log.jsonl").read_text().splitlines()] == [0, 1]


@pytest.mark.parametrize("lora_r", [0, 4])
def test_gradient_checkpointing_recomputes_and_gives_the_same_update(tmp_path, tiny_lm_path, env_kwargs, resources,
                                                                     varied_advantages, lora_r):  # fmt: skip
    from agents.llm import add_lora, enable_gradient_checkpointing, load_causal_lm
    from agents.rollout import token_logprobs

    if lora_r:
        pytest.importorskip("peft")

    def grads(checkpointing: bool):
        model, _ = load_causal_lm(str(tiny_lm_path), trainable_adapter=True)
        model = add_lora(model, lora_r) if lora_r else model
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        # the layer's first module: a recompute runs it again (it may stop before the layer's last ones)
        norm = next(m for n, m in model.named_modules() if n.endswith("layers.0.input_layernorm"))
        calls = []
        norm.register_forward_hook(lambda *_: calls.append(1))
        ids = torch.randint(3, 50, (2, 24), generator=torch.Generator().manual_seed(0))
        needed = torch.zeros_like(ids)
        needed[:, 10:] = 1
        lp = token_logprobs(model, ids, torch.ones_like(ids), temperature=0.7, needed=needed)
        (lp * needed).sum().backward()
        named = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return named, len(calls)

    plain, plain_calls = grads(False)
    checkpointed, checkpointed_calls = grads(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the layer ran again in the backward pass
    assert plain.keys() == checkpointed.keys()
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # a whole training step: the same log and weights as without
    a = train(_args(tmp_path / "a", tiny_lm_path, lora_r=lora_r, temperature=1.5), env_kwargs, progress=False)
    b = train(_args(tmp_path / "b", tiny_lm_path, lora_r=lora_r, temperature=1.5, gradient_checkpointing=True),
              env_kwargs, progress=False)  # fmt: skip
    la, lb = (json.loads((tmp_path / d / "log.jsonl").read_text()) for d in "ab")
    assert la["grad_norm"] > 0 and lb["grad_norm"] == pytest.approx(la["grad_norm"], rel=1e-4)
    ma, mb = load_causal_lm(str(a))[0], load_causal_lm(str(b))[0]
    for pa, pb in zip(ma.parameters(), mb.parameters(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_refuses_share_prefix():
    from agents.sft import SFTArgs

    for cls in (GRPOArgs, SFTArgs):
        with pytest.raises(ValueError, match="gradient_checkpointing and share_prefix exclude each other"):
            cls(gradient_checkpointing=True, share_prefix=True)
        assert cls(gradient_checkpointing=True).gradient_checkpointing


DDP_JOB = """
import hashlib, json, os, sys
import numpy as np
import agents.grpo as grpo
from agents.grpo import GRPOArgs, train
from agents.llm import load_causal_lm
from deeprec_env.trm import TRMConfig

lm, enc, out, trm = sys.argv[1:5]
digest = lambda m: hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in m.parameters())).hexdigest()
grpo.compute_advantages = lambda r, whiten: np.tile([1.0, -1.0], r.size // 2).reshape(r.shape)  # varied
save = grpo.save_checkpoint


def spy(path, model, tok, opt, step, args, accelerator=None, **kw):  # each process's weights after its update
    with open(f"{out}/rank{accelerator.process_index}.txt", "w") as f:
        f.write(digest(accelerator.unwrap_model(model)))
    return save(path, model, tok, opt, step, args, accelerator, **kw)


grpo.save_checkpoint = spy
share = os.environ.get("SHARE_PREFIX") == "1"  # micro-batches of a process's 2 rollouts, prompt prefix run once
# KL_ADAPTER: a LoRA policy whose KL reference is its own base (adapter switched off between passes); 2 updates
kl = dict(lora_r=4, kl_coef=0.5, kl_reference="adapter", mini_batches=2) if os.environ.get("KL_ADAPTER") else {}
args = GRPOArgs(model=lm, steps=1, users_per_step=2, group_size=2, max_new_tokens=6, micro_batch=2 if share else 1,
                rollout_batch=2, val_users=0, out=out, lr=1e-3, temperature=1.5, share_prefix=share, **kl)
train(args, dict(dataset="synthetic", encoder=enc, trm=TRMConfig(**json.loads(trm))), progress=False)
with open(f"{out}/initial.txt", "w") as f:
    f.write(digest(load_causal_lm(lm)[0]))
"""


def _torchrun(out, tiny_lm_path, tiny_encoder_path, port: int, **env_extra) -> list[dict]:
    """Run DDP_JOB in two CPU processes (gloo); returns its log."""
    import os
    import subprocess
    import sys

    from deeprec_env.fixtures import TINY_TRM

    out.mkdir(parents=True)
    script = out / "job.py"
    script.write_text(DDP_JOB)
    # accelerate's own launcher needs MPI for several CPU processes; torchrun sets the same environment
    # (RANK, WORLD_SIZE, ...) that Accelerator reads, which is how multi-node GPU jobs launch too.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script), str(tiny_lm_path), str(tiny_encoder_path), str(out), json.dumps(TINY_TRM)]  # fmt: skip
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **env_extra}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(("share", "kl_adapter"), [("0", ""), ("1", ""), ("0", "1")])
def test_two_processes_under_torchrun(tmp_path, tiny_lm_path, tiny_encoder_path, resources, share, kl_adapter):
    """The DDP path for real: two CPU processes (gloo), rewards gathered, gradients averaged.

    With ``share_prefix`` the model runs twice (prefix, then rows) before each backward: DDP must still
    average every gradient once. With a LoRA policy's adapter reference, the adapter's trainable flags are
    switched off and on around every reference pass: DDP must still average the adapter's gradients.
    """
    if kl_adapter:
        pytest.importorskip("peft")
    out = tmp_path / "run"
    port = 29517 + int(share) + 2 * bool(kl_adapter)
    log = _torchrun(out, tiny_lm_path, tiny_encoder_path, port, SHARE_PREFIX=share, KL_ADAPTER=kl_adapter)
    assert len(log) == 1 and log[0]["processes"] == 2 and log[0]["grad_norm"] > 0
    assert (log[0]["kl"] > 0) == bool(kl_adapter)
    # both users' groups were rolled out (one per process) and counted in the gathered statistics
    assert log[0]["policy_tokens"] > 0
    digests = {(out / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert len(digests) == 1  # gradients were averaged: both processes hold the same updated weights
    assert digests != {(out / "initial.txt").read_text()}


def test_grpo_module_has_a_cli(capsys):
    from agents.grpo import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--mini-batches" in text and "--top-k" in text and "--stage" in text


@pytest.mark.parametrize(
    ("module", "argv", "message"),
    [
        ("agents.grpo", ["--steps", "0"], "steps=0; must be >= 1"),
        ("agents.grpo", ["--gradient-checkpointing", "true", "--share-prefix", "true"], "exclude each other"),
        ("agents.grpo", ["--kl-coef", "0.1", "--kl-reference", "adapter"], "kl_reference='adapter' needs a LoRA"),
        ("agents.sft", ["--episodes", "0"], "episodes=0; must be >= 1"),
        ("agents.curriculum", ["--group-size", "0"], "group_size=0; must be >= 1"),
        ("agents.curriculum", ["--warm-start", "history-facet", "--warm-start-epochs", "0"], "warm start: epochs=0"),
        ("agents.curriculum", ["--coldstart-steps", "-1"], "argument --coldstart-steps: -1; must be >= 0"),
        ("agents.curriculum", ["--rec-steps", "0"], "argument --rec-steps: 0; must be >= 1"),  # was a traceback
        ("agents.curriculum", ["--warm-start", "nosuch"], "warm start: teacher='nosuch'; must be one of"),
        ("agents.curriculum", ["--warm-start", "oracle-preference"], "reads the target"),  # was raised mid-run
        ("agents.sft", ["--teacher", "oracle-preference"], "reads the target"),
        ("agents.grpo", ["--lr", "0"], "lr=0.0; must be > 0"),
    ],
)
def test_agent_clis_refuse_bad_settings_in_one_line(module, argv, message, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
    assert e.value.code == 2  # argparse's usage error, before anything is loaded or trained
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_varying_groups_counts_groups_whose_samples_differ():
    from types import SimpleNamespace as N

    from agents.grpo import varying_groups

    def ro(reward, hit, point, retrieved=0.0):  # retrieval_hit comes at a call: 0 in the answer step's components
        last = {"hit": hit, "point": point, "retrieval_hit": 0.0}
        return N(reward=reward, record=N(reward_components=last,
                                         episode_reward_components={**last, "retrieval_hit": retrieved}))  # fmt: skip

    groups = [[ro(3.0, 1.0, 2.0, 1.0), ro(2.0, 0.0, 2.0)],  # differs in hit (and in its calls' retrieval)
              [ro(1.0, 0.0, 1.0), ro(1.5, 0.0, 1.5)],  # differs in point only
              [ro(0.0, 0.0, 0.0), ro(0.0, 0.0, 0.0)]]  # no signal  # fmt: skip
    flat = [r for g in groups for r in g]
    keys = ["hit", "point", "retrieval_hit"]
    assert varying_groups(flat, 2, keys) == [2, 1, 1, 1]  # the episode's sums, not the last step's
    assert varying_groups(flat, 6, keys) == [1, 1, 1, 1]


def test_cli_refuses_a_run_folder_with_other_settings_in_one_line(tmp_path):
    """`python -m agents.grpo` on a folder whose checkpoint has another lr: one error line, nothing written."""
    from agents.grpo import main

    state = tmp_path / "checkpoint" / "trainer_state.json"
    state.parent.mkdir()
    state.write_text(json.dumps({"step": 1, "args": {**asdict(GRPOArgs(out=str(tmp_path))), "lr": 0.5}, "log": []}))
    with pytest.raises(SystemExit, match=r"^error: .* started with lr=0\.5 \(now 0\.001\); a run continues only"):
        main(["--out", str(tmp_path), "--lr", "0.001", "--steps", "3"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
