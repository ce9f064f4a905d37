import numpy as np
import pytest
import torch

from deeprec_env.data import synthetic
from deeprec_env.embed import item_text_embeddings
from deeprec_env.metrics import ndcg_at_k
from deeprec_env.preferences import PreferenceMix, oracle_preference, top_history_categories, wrong_categories
from deeprec_env.trm import (
    TRMConfig,
    _windows,
    evaluate_ranks,
    load_trm,
    rank_examples,
    save_trm,
    train_trm,
    trm_sequences,
    weights_digest,
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
        assert weights_digest(trained[0]) == weights_digest(again)

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
        assert weights_digest(loaded) == weights_digest(model)
        changed = load_trm(path, tiny_ds)
        with torch.no_grad():
            next(changed.parameters()).view(-1)[0] += 1.0
        assert weights_digest(changed) != weights_digest(model)
        save_trm(model, path, tiny_ds)  # overwrite in place
        assert sorted(p.name for p in tmp_path.iterdir()) == ["trm"]

    def test_refuses_other_dataset(self, trained, tiny_ds, tmp_path):
        path = save_trm(trained[0], tmp_path / "trm", tiny_ds)
        with pytest.raises(ValueError, match="was trained on dataset 'synthetic'"):
            load_trm(path, synthetic(60, 40, seed=99))


class TestPreferenceTRM(TRMTests):
    config = TRMConfig(**TINY)

    def test_probe_directions(self, tiny_encoder):
        """A category of the target helps, a wrong one hurts without erasing the history, and the history's
        own category costs little."""
        ds = synthetic(300, 40, seed=1, loyalty=0.4)  # the history leaves the next genre open
        shares = dict.fromkeys(PreferenceMix().weights, 0.0) | {"target_categories": 0.5, "history_categories": 0.2,
                                                                 "noise": 0.3}  # fmt: skip
        mix = PreferenceMix(**shares)
        cfg = TRMConfig(**{**TINY, "max_epochs": 25, "lr": 0.01}, preferences=mix)
        model, _ = train_trm(ds, cfg, tiny_encoder, progress=False)
        sp, cat = ds.split("test"), ds.catalog

        def ndcg(prefs):
            return ndcg_at_k(evaluate_ranks(model, ds, "test", prefs, tiny_encoder), 10)

        targets = [int(t) for t in sp.targets]
        none = ndcg(None)
        one = ndcg([cat.categories[t][0] for t in targets])
        full = ndcg([oracle_preference(cat, t) for t in targets])
        wrong = ndcg([wrong_categories(cat, t, 1) for t in targets])
        history = ndcg([top_history_categories(cat, sp.history(i, 12)) for i in range(len(sp))])
        assert min(one, full) > none + 0.01 and none > wrong + 0.01 and wrong > 0.5 * none
        assert history > 0.95 * none

    def test_reference_fusion_and_no_preference_terms(self, tiny_ds, tiny_encoder):
        cfg = TRMConfig(**{**TINY, "max_epochs": 1}, fusion="add", item_text_out=False)
        model, _ = train_trm(tiny_ds, cfg, tiny_encoder, progress=False)
        assert not hasattr(model, "gate")
        seqs = torch.as_tensor(tiny_ds.split("test").histories(cfg.max_len)[:4])
        with torch.no_grad():
            u = model.user_vectors(seqs)
            assert torch.allclose(u.norm(dim=-1), torch.ones(4), atol=1e-5)  # LayerNorm then unit length
            assert torch.equal(model.item_vectors()[1:], torch.nn.functional.normalize(model.item_emb.weight[1:]))

    def test_gated_preference_is_weighted_evidence(self, trained, tiny_ds, tiny_encoder):
        model, _ = trained
        seqs = torch.as_tensor(tiny_ds.split("test").histories(self.config.max_len)[:3])
        pref = torch.as_tensor(tiny_encoder.encode(["Comedy", "Drama", ""]))
        has = torch.tensor([True, True, False])
        with torch.no_grad():
            base = model.user_vectors(seqs)
            q = model.user_vectors(seqs, pref, has)
        assert torch.allclose(q[2], base[2])  # no preference: the history's query, unchanged
        extra = q[:2] - base[:2]  # trust * unit(preference): a non-negative multiple of a unit vector
        assert torch.all(extra.norm(dim=-1) > 0)


class TestSASRecBaseline(TRMTests):
    config = TRMConfig(**TINY, use_text=False, use_preference=False, score="dot")


def test_held_out_items(tiny_ds):
    seqs = tiny_ds.train_sequences()
    assert [len(s) for s in trm_sequences(tiny_ds, TRMConfig(held_out=2))] == [len(s) for s in seqs]
    assert [len(s) for s in trm_sequences(tiny_ds, TRMConfig(held_out=3))] == [len(s) - 1 for s in seqs]
    with pytest.raises(ValueError, match="held_out=1"):
        TRMConfig(held_out=1)


def test_rank_examples_top_items(trained_tiny, tiny_ds):
    model = trained_tiny
    sp = tiny_ds.split("test")
    hist = sp.histories(model.config.max_len)
    ranks, top = rank_examples(model, hist, sp.targets, top=5)
    assert top.shape == (len(sp), 5) and (top > 0).all()
    hit = ranks < 5
    assert all(top[i, ranks[i]] == sp.targets[i] for i in np.flatnonzero(hit))


@pytest.fixture(scope="module")
def trained_tiny(tiny_ds, tiny_encoder):
    return train_trm(tiny_ds, TRMConfig(**{**TINY, "max_epochs": 1}), tiny_encoder, progress=False)[0]


def test_config_reads_preference_mix_from_a_dict():
    cfg = TRMConfig(preferences={"none": 1.0, "noise": 0.5})
    assert isinstance(cfg.preferences, PreferenceMix) and cfg.preferences.noise == 0.5
    with pytest.raises(TypeError, match="PreferenceMix"):
        TRMConfig(preferences=3)
    with pytest.raises(ValueError, match="fusion='mul'"):
        TRMConfig(fusion="mul")
    with pytest.raises(ValueError, match="ema=1"):
        TRMConfig(ema=1)


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
