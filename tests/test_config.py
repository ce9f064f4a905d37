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
