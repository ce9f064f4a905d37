"""Bad configuration values fail at construction with a message naming the field; nothing is coerced."""

import numpy as np
import pytest

from deeprec_env.env import DeepRecEnv, EnvConfig
from deeprec_env.index import IndexConfig
from deeprec_env.trm import TRMConfig

BAD_ENV = [
    ("retrieval_k", "20"),
    ("retrieval_k", 2.5),
    ("max_calls", None),
    ("max_calls", 1.5),
    ("answer_k", 2.5),
    ("users", True),
    ("fuzzy_cutoff", -1),
    ("fuzzy_cutoff", "0.9"),
    ("reward_weights", {"format": float("nan")}),
    ("reward_weights", {"format": "1"}),
    ("reward_weights", [("format", 1.0)]),
    ("protocol", "x"),
    ("trm", "small"),
    ("index", {"kind": "annoy"}),
    ("encoder", "/nonexistent/encoder"),
    ("encoder", 3),
    ("dataset_path", "/nonexistent/ratings.csv"),
    ("trm_checkpoint", "/nonexistent/trm"),
    ("split", "Test"),
    ("stage", 1),
    ("dedup_retrieved", "yes"),
    ("dedup_retrieved", 1),
    ("threads", 0),
    ("threads", 1.0),
    ("rl_share", float("inf")),
    ("max_obs_chars", True),
    ("preprocess", {"min_user_count": 2.5}),
]


@pytest.mark.parametrize(("field", "value"), BAD_ENV)
def test_bad_env_config_names_the_field(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        EnvConfig(**{field: value})


def test_nested_configs_may_be_dicts():
    cfg = EnvConfig(trm={"d_model": 32, "n_heads": 2}, index={"kind": "hnsw"}, preprocess={"min_user_count": 5})
    assert isinstance(cfg.trm, TRMConfig) and cfg.trm.d_model == 32
    assert isinstance(cfg.index, IndexConfig) and cfg.index.kind == "hnsw"
    hash(cfg)  # still a cache key
    with pytest.raises(TypeError, match=r"TRMConfig.max_epochs=2.5"):
        EnvConfig(trm={"max_epochs": 2.5})


@pytest.mark.parametrize(
    ("config", "kwargs"),
    [
        (TRMConfig, {"lr": "0.1"}),
        (TRMConfig, {"dropout": float("nan")}),
        (TRMConfig, {"fusion": "concat"}),
        (IndexConfig, {"threads": 1.5}),
        (IndexConfig, {"hnsw_m": "32"}),
    ],
)
def test_other_configs_check_types(config, kwargs):
    (field,) = kwargs
    with pytest.raises((ValueError, TypeError), match=f"{config.__name__}.{field}"):
        config(**kwargs)


@pytest.mark.parametrize("options", [{"user": 1.7}, {"example": "3"}, {"user": True}, {"user": None}, ["user"]])
def test_bad_reset_options(make_env, options):
    env = make_env()
    with pytest.raises((ValueError, TypeError), match="options"):
        env.reset(options=options)


def test_integer_reset_options_of_any_kind(make_env):
    env: DeepRecEnv = make_env()
    u = int(env.split.users[0])
    for value in (u, np.int64(u), np.array(u)):
        _, info = env.reset(options={"user": value})
        assert info["user"] == u


def test_paths_may_be_pathlike(tmp_path):
    (tmp_path / "ratings.csv").write_text("user_id,item_id,timestamp\n")
    cfg = EnvConfig(dataset="atomic", dataset_path=tmp_path / "ratings.csv")
    assert cfg.dataset_path == str(tmp_path / "ratings.csv")


# --- devices and dtypes -------------------------------------------------------------------------------------


def _settings_classes():
    from agents.evaluate import EvalArgs
    from agents.grpo import GRPOArgs
    from agents.sft import SFTArgs

    return [TRMConfig, GRPOArgs, SFTArgs, EvalArgs]


@pytest.mark.parametrize("device", ["nonsense", "cuda:x", "", 3])
def test_settings_refuse_a_name_that_is_no_torch_device(device):
    for cls in _settings_classes():
        with pytest.raises((ValueError, TypeError), match=f"{cls.__name__}.device"):
            cls(device=device)


def test_settings_refuse_an_unknown_dtype():
    for cls in _settings_classes():
        with pytest.raises(ValueError, match=f"{cls.__name__}.dtype='float8'"):
            cls(dtype="float8")


def test_settings_may_name_a_gpu_this_machine_lacks():
    # a settings object may describe a run for another machine (agents.grpo.PAPER_SCALE); using it here is the error
    for cls in _settings_classes():
        assert cls(device="cuda:1", dtype="bfloat16").device == "cuda:1"


def _no_cuda(monkeypatch, n: int = 0):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_torch_device_refuses_a_gpu_torch_cannot_use(monkeypatch):
    from deeprec_env.config import torch_device

    _no_cuda(monkeypatch)
    assert str(torch_device("cpu")) == "cpu"
    with pytest.raises(ValueError, match=r"device='cuda', but torch .* sees no CUDA device"):
        torch_device("cuda")
    _no_cuda(monkeypatch, 2)
    assert str(torch_device("cuda:1")) == "cuda:1"
    with pytest.raises(ValueError, match=r"X='cuda:2', but torch sees 2 CUDA device\(s\): cuda:0 to cuda:1"):
        torch_device("cuda:2", "X")
    with pytest.raises(ValueError, match="expected a torch device"):
        torch_device("gpu")


def test_no_model_path_falls_back_to_the_cpu(monkeypatch, tmp_path, tiny_encoder_path, tiny_lm_path):
    # accelerate and stable-baselines3 would quietly run on the CPU; torch would fail late: each refuses at once
    from agents.grpo import GRPOArgs, train
    from agents.llm import load_causal_lm
    from deeprec_env.embed import TextEncoder
    from deeprec_env.trm import load_trm

    _no_cuda(monkeypatch)
    gpu = "no CUDA device"
    with pytest.raises(ValueError, match=gpu):
        train(GRPOArgs(model=str(tiny_lm_path), device="cuda", dataset="synthetic", out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ValueError, match=gpu):
        load_causal_lm(str(tiny_lm_path), device="cuda")
    with pytest.raises(ValueError, match="dtype='float8'"):
        load_causal_lm(str(tiny_lm_path), dtype="float8")
    with pytest.raises(ValueError, match=gpu):
        TextEncoder(tiny_encoder_path, device="cuda")
    with pytest.raises(ValueError, match=gpu):
        load_trm(tmp_path / "no-such-trm", device="cuda")
    assert TRMConfig(device="cuda").device == "cuda"


def test_ppo_refuses_a_gpu_this_machine_lacks(monkeypatch):
    pytest.importorskip("stable_baselines3")
    from agents.sb3 import PPOArgs, train_ppo

    _no_cuda(monkeypatch)
    with pytest.raises(ValueError, match=r"PPOArgs.device='cuda'"):
        train_ppo(PPOArgs(device="cuda", dataset="synthetic"))


COMMANDS = ["agents.grpo", "agents.sft", "agents.curriculum", "agents.evaluate", "agents.sb3", "benchmarks.main",
            "benchmarks.trm_quality", "benchmarks.llm_speed", "benchmarks.update_speed", "benchmarks.retrieval_speed",
            "benchmarks.curriculum_cpu", "benchmarks.train_step_gpu"]  # fmt: skip


@pytest.mark.parametrize("module", COMMANDS)
def test_commands_refuse_a_device_this_machine_lacks_in_one_line(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:  # no machine has 100 GPUs: refused while parsing, before any work
        importlib.import_module(module).main(["--device", "cuda:99"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "device='cuda:99', but torch" in err and "Traceback" not in err


def test_deeprec_command_refuses_a_gpu_this_machine_lacks(monkeypatch, capsys):
    from deeprec_env import cli

    _no_cuda(monkeypatch)
    assert cli.main(["trm-train", "--dataset", "synthetic", "--out", "x", "--device", "cuda:0"]) == 2
    assert "--device='cuda:0', but torch" in capsys.readouterr().err


TRAINER_REFUSALS = [
    ({"lr": 0.0}, "lr=0.0; must be > 0"),
    ({"lr": -1e-5}, "lr=-1e-05; must be > 0"),
    ({"grad_clip": 0.0}, "grad_clip=0.0; must be > 0"),  # clip_grad_norm_ to 0 zeroes every gradient
    ({"betas": (1.0, 0.95)}, r"betas=\(1.0, 0.95\); each must be in \[0, 1\)"),
    ({"lora_r": -1}, "lora_r=-1; must be >= 0"),  # read as full fine-tuning before
    ({"prompt_history": 0}, "prompt_history=0; must be >= 1"),
    ({"retrieval_k": 0}, "retrieval_k=0; must be >= 1"),
]


@pytest.mark.parametrize(("kwargs", "message"), TRAINER_REFUSALS)
def test_trainer_settings_refuse_what_would_train_nothing(kwargs, message):
    from agents.grpo import GRPOArgs
    from agents.sft import SFTArgs

    for cls in (GRPOArgs, SFTArgs):
        with pytest.raises(ValueError, match=message):
            cls(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kl_coef": -0.1}, "kl_coef=-0.1; must be >= 0"),  # a negative KL coefficient rewards drifting away
        ({"val_users": -1}, "val_users=-1"),
        ({"eval_every": 0}, "eval_every=0"),
        ({"difficulty_top": 0}, "difficulty_top=0"),
    ],
)
def test_rl_settings_refuse_out_of_range(kwargs, message):
    from agents.grpo import PAPER_SCALE, GRPOArgs

    with pytest.raises(ValueError, match=message):
        GRPOArgs(**kwargs)
    for stage in PAPER_SCALE.values():  # the presets stay valid
        GRPOArgs(**stage)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timesteps": 0}, "timesteps=0"),  # saved an untrained model before
        ({"n_facets": 0}, "n_facets=0"),
        ({"n_steps": 1}, "n_steps=1; must be >= 2"),  # stable-baselines3's own assertion, late
        ({"batch_size": 1}, "batch_size=1; must be >= 2"),
        ({"lr": 0.0}, "lr=0.0"),
        ({"split": "Test"}, "PPOArgs.split='Test'"),
        ({"timesteps": 1.5}, "PPOArgs.timesteps=1.5"),
    ],
)
def test_ppo_settings_refuse_out_of_range(kwargs, message):
    from agents.sb3 import PPOArgs

    with pytest.raises((ValueError, TypeError), match=message):
        PPOArgs(**kwargs)
