import numpy as np
import pytest
import torch

from deeprec_env.data import synthetic
from deeprec_env.embed import item_text_embeddings
from deeprec_env.metrics import ndcg_at_k
from deeprec_env.trm import (
    TRMConfig,
    _windows,
    evaluate_ranks,
    load_trm,
    misleading_preference,
    oracle_preference,
    preference_bank,
    save_trm,
    train_trm,
)

TINY = dict(d_model=16, n_heads=2, ffn_dim=32, max_len=12, max_epochs=4, patience=10, batch_size=32, lr=5e-3)


class TRMTests:
    """Contract every TRM configuration must satisfy; subclasses set ``config``."""

    config: TRMConfig

    @pytest.fixture(scope="class")
    @classmethod
    def trained(cls, tiny_ds, tiny_encoder):
        return train_trm(tiny_ds, cls.config, tiny_encoder, progress=False)

    def test_learns_and_logs(self, trained):
        model, log = trained
        assert log["epochs_run"] >= 1
        losses = [e["loss"] for e in log["epochs"]]
        assert np.isfinite(losses).all() and losses[-1] < losses[0]
        assert not model.training

    def test_same_seed_same_model(self, trained, tiny_ds, tiny_encoder):
        again, log2 = train_trm(tiny_ds, self.config, tiny_encoder, progress=False)
        for (k, a), b in zip(trained[0].state_dict().items(), again.state_dict().values(), strict=True):
            assert torch.equal(a, b), k
        assert trained[1]["best_valid_ndcg10"] == log2["best_valid_ndcg10"]

    def test_training_leaves_global_rng_alone(self, tiny_ds, tiny_encoder):
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        train_trm(tiny_ds, TRMConfig(**{**TINY, "max_epochs": 1}), tiny_encoder, progress=False)
        assert torch.equal(torch.rand(3), expected)

    def test_save_load_round_trip(self, trained, tiny_ds, tmp_path):
        model, _ = trained
        path = save_trm(model, tmp_path / "trm", tiny_ds)
        assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
        loaded = load_trm(path, tiny_ds)
        seqs = torch.as_tensor(tiny_ds.split("test").histories(self.config.max_len)[:5])
        with torch.no_grad():
            assert torch.allclose(model.scores(seqs), loaded.scores(seqs))
        save_trm(model, path, tiny_ds)  # overwrite in place
        assert sorted(p.name for p in tmp_path.iterdir()) == ["trm"]

    def test_refuses_other_dataset(self, trained, tiny_ds, tmp_path):
        path = save_trm(trained[0], tmp_path / "trm", tiny_ds)
        with pytest.raises(ValueError, match="was trained on dataset 'synthetic'"):
            load_trm(path, synthetic(60, 40, seed=99))


class TestPreferenceTRM(TRMTests):
    config = TRMConfig(**TINY)

    def test_follows_preference(self, tiny_encoder):
        tiny_ds = synthetic(300, 40, seed=1)
        model, _ = train_trm(tiny_ds, TRMConfig(**{**TINY, "max_epochs": 15}), tiny_encoder, progress=False)
        sp = tiny_ds.split("test")
        none = ndcg_at_k(evaluate_ranks(model, tiny_ds, "test"), 10)
        oracle = ndcg_at_k(
            evaluate_ranks(
                model, tiny_ds, "test", [oracle_preference(tiny_ds, int(t)) for t in sp.targets], tiny_encoder
            ),
            10,
        )
        mislead = ndcg_at_k(
            evaluate_ranks(
                model, tiny_ds, "test", [misleading_preference(tiny_ds, int(t)) for t in sp.targets], tiny_encoder
            ),
            10,
        )
        assert oracle > none > mislead


class TestSASRecBaseline(TRMTests):
    config = TRMConfig(**TINY, use_text=False, use_preference=False, score="dot")


def test_preference_bank(tiny_ds):
    texts, off, idx = preference_bank(tiny_ds)
    for i in range(1, tiny_ds.catalog.num_embeddings):
        cands = {texts[j] for j in idx[off[i] : off[i + 1]]}
        cats = tiny_ds.catalog.categories[i]
        assert "; ".join(cats) in cands
        assert all(set(c.split("; ")) <= set(cats) for c in cands)
    assert misleading_preference(tiny_ds, 1) and not set(misleading_preference(tiny_ds, 1).split("; ")) & set(
        tiny_ds.catalog.categories[1]
    )


def test_windows_cover_targets():
    rng = np.random.default_rng(0)
    seqs = [np.arange(1, 30), np.arange(1, 3), np.arange(1, 2)]
    w = _windows(seqs, 10, rng)
    assert w.shape[1] == 11
    assert w[0, -1] == 29  # the first window of a sequence ends at its last item
    inp, tgt = w[:, :-1], w[:, 1:]
    trained = tgt[(inp > 0) & (tgt > 0)].tolist()
    assert 2 in trained  # from the 2-item sequence
    assert set(range(20, 30)) <= set(trained)
    assert len(w) == 1 + 1 + len(range(29 - 10 - int(np.random.default_rng(0).integers(0, 10)), 1, -10))


def test_config_validation():
    with pytest.raises(ValueError, match="d_model=10 is not divisible by n_heads=3"):
        TRMConfig(d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="dropout=1"):
        TRMConfig(dropout=1)
    with pytest.raises(ValueError, match="score='l2'"):
        TRMConfig(score="l2")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a TRM checkpoint"):
        load_trm(tmp_path)


def test_text_embeddings_are_frozen(tiny_ds, tiny_encoder):
    emb = item_text_embeddings(tiny_ds.catalog, tiny_encoder)
    model, _ = train_trm(tiny_ds, TRMConfig(**{**TINY, "max_epochs": 1}), tiny_encoder, progress=False)
    assert np.allclose(model.text_emb.numpy(), emb)
    assert "text_emb" not in dict(model.named_parameters())
