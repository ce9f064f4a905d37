import numpy as np
import pytest

from deeprec_env.index import IndexConfig, ItemIndex
from deeprec_env.retrieval import Retriever
from deeprec_env.trm import TRMConfig, train_trm

TINY = TRMConfig(d_model=16, n_heads=2, ffn_dim=32, max_len=12, max_epochs=2, batch_size=32)


@pytest.fixture(scope="module")
def retriever(tiny_ds, tiny_encoder):
    trm, _ = train_trm(tiny_ds, TINY, tiny_encoder, progress=False)
    return Retriever(trm, tiny_encoder)


def histories(ds, n=6):
    sp = ds.split("test")
    return [sp.history(i) for i in range(n)]


def test_batch_equals_single(retriever, tiny_ds):
    hs = histories(tiny_ds)
    prefs = ["drama", "", "comedy; action", "drama", "  ", "horror"]
    ids, scores = retriever.retrieve(hs, prefs, k=10)
    assert ids.shape == scores.shape == (6, 10)
    for i in range(6):
        one, s1 = retriever.retrieve([hs[i]], [prefs[i]], k=10)
        assert np.array_equal(one[0], ids[i])
        assert np.allclose(s1[0], scores[i], atol=1e-5)


def test_empty_preference_means_none(retriever, tiny_ds):
    hs = histories(tiny_ds, 3)
    a, _ = retriever.retrieve(hs, ["", " ", "\n"], k=10)
    b, _ = retriever.retrieve(hs, None, k=10)
    assert np.array_equal(a, b)
    c, _ = retriever.retrieve(hs, ["drama"] * 3, k=10)
    assert not np.array_equal(a, c)


def test_exclusions(retriever, tiny_ds):
    hs = histories(tiny_ds, 3)
    ids, _ = retriever.retrieve(hs, None, k=10, exclude_history=True)
    for h, row in zip(hs, ids, strict=True):
        assert not set(row.tolist()) & set(h.tolist())
    first, _ = retriever.retrieve(hs, None, k=5)
    second, _ = retriever.retrieve(hs, None, k=5, exclude=[r.tolist() for r in first])
    for a, b in zip(first, second, strict=True):
        assert not set(a.tolist()) & set(b.tolist())


def test_approximate_index_option(retriever, tiny_ds, tiny_encoder):
    hnsw = Retriever(retriever.trm, tiny_encoder, IndexConfig(kind="hnsw"))
    a, _ = retriever.retrieve(histories(tiny_ds), None, k=5)
    b, _ = hnsw.retrieve(histories(tiny_ds), None, k=5)
    assert np.mean([len(set(x) & set(y)) / 5 for x, y in zip(a, b, strict=True)]) > 0.9


def test_bad_input(retriever, tiny_ds):
    hs = histories(tiny_ds, 2)
    with pytest.raises(TypeError, match="preferences must be str"):
        retriever.retrieve(hs, ["drama", 3])
    with pytest.raises(ValueError, match="1 preferences for 2 histories"):
        retriever.retrieve(hs, ["drama"])
    with pytest.raises(ValueError, match="history item ids must be in"):
        retriever.retrieve([np.array([10_000])], None)
    with pytest.raises(ValueError, match="index dim"):
        Retriever(retriever.trm, None, index=ItemIndex(np.ones((4, 3), np.float32)))


def test_deterministic(tiny_ds, tiny_encoder):
    a = Retriever(train_trm(tiny_ds, TINY, tiny_encoder, progress=False)[0], tiny_encoder)
    b = Retriever(train_trm(tiny_ds, TINY, tiny_encoder, progress=False)[0], tiny_encoder)
    hs = histories(tiny_ds)
    assert np.array_equal(a.retrieve(hs, ["drama"] * 6)[0], b.retrieve(hs, ["drama"] * 6)[0])


def test_rank_orders_by_no_preference_score(retriever, tiny_ds):
    h = histories(tiny_ds, 1)[0]
    top, _ = retriever.retrieve([h], None, k=8)
    items = list(reversed(top[0].tolist()))
    assert retriever.rank(h, items) == top[0].tolist()
    assert retriever.rank(h, []) == []


def test_history_state_cache_gives_the_uncached_vectors(retriever, tiny_ds, monkeypatch):
    import torch

    sp = tiny_ds.split("test")
    hist = [sp.history(i, 12) for i in range(6)]
    prefs = ["drama", "", "comedy", "drama", "old movies", ""]
    retriever.clear_cache()
    cold = retriever.user_vectors(hist, prefs)
    assert len(retriever._states) == len({h.tobytes() for h in retriever._pad(hist)})
    np.testing.assert_array_equal(cold, retriever.user_vectors(hist, prefs))  # every state from the cache
    shuffled = retriever.user_vectors(hist[::-1], prefs[::-1])[::-1]  # another batch order: float rounding only
    np.testing.assert_allclose(cold, shuffled, rtol=0, atol=1e-6)
    with torch.inference_mode():  # the model's own end-to-end path
        seqs = torch.as_tensor(retriever._pad(hist))
        from deeprec_env.embed import preference_vectors

        vecs, given = preference_vectors(retriever.encoder, prefs)
        ref = retriever.trm.user_vectors(seqs, torch.as_tensor(vecs), torch.as_tensor(given)).numpy()
    np.testing.assert_allclose(cold, ref, rtol=0, atol=1e-6)
    monkeypatch.setattr(type(retriever), "STATE_CACHE", 2)
    retriever.user_vectors(hist, prefs)
    assert len(retriever._states) == 2  # bounded: least recently used histories are dropped


@pytest.mark.parametrize("fusion", ["gated", "add"])
def test_cached_fusion_equals_the_model(tiny_ds, tiny_encoder, fusion):
    """The retriever's cached parts (history query, adapted preferences) give the model's own vectors."""
    import dataclasses

    import torch

    from deeprec_env.embed import preference_vectors

    cfg = dataclasses.replace(TINY, fusion=fusion, max_epochs=1)
    r = Retriever(train_trm(tiny_ds, cfg, tiny_encoder, progress=False)[0], tiny_encoder)
    hist = histories(tiny_ds, 5)
    prefs = ["drama", "", "comedy  action", "drama", "\t"]
    for _ in range(2):  # cold, then every part from the caches
        got = r.user_vectors(hist, prefs)
        with torch.inference_mode():
            vecs, given = preference_vectors(tiny_encoder, prefs)
            ref = r.trm.user_vectors(torch.as_tensor(r._pad(hist)), torch.as_tensor(vecs), torch.as_tensor(given))
        np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-6)
    assert set(r._adapted) == {"drama", "comedy action"}  # white space collapsed, empty ones not adapted
    with torch.inference_mode():
        np.testing.assert_allclose(r.user_vectors(hist), r.trm.user_vectors(torch.as_tensor(r._pad(hist))).numpy())


def test_preference_cache_is_bounded(retriever, tiny_ds, monkeypatch):
    monkeypatch.setattr(type(retriever), "PREFERENCE_CACHE", 3)
    retriever.clear_cache()
    h = histories(tiny_ds, 1) * 5
    first = retriever.user_vectors(h, ["a", "b", "c", "d", "e"])
    assert list(retriever._adapted) == ["c", "d", "e"]  # least recently used dropped
    np.testing.assert_allclose(retriever.user_vectors(h, ["a", "b", "c", "d", "e"]), first, rtol=0, atol=1e-6)


def test_prefetch_encodes_in_batches_and_changes_nothing(retriever, tiny_ds):
    sp = tiny_ds.split("test")
    hist = [sp.history(i, 12) for i in range(len(sp))]
    retriever.clear_cache()
    one_by_one = np.stack([retriever.user_vectors([h], ["drama"])[0] for h in hist])
    retriever.clear_cache()
    assert not retriever.cached(hist[0])
    retriever.prefetch(hist, batch_size=4)
    assert all(retriever.cached(h) for h in hist)
    batched = retriever.user_vectors(hist, ["drama"] * len(hist))
    np.testing.assert_allclose(batched, one_by_one, rtol=0, atol=1e-6)  # float rounding of another batch size


def test_env_reset_prefetches_its_block(resources, env_kwargs):
    from deeprec_env.env import DeepRecEnv

    env = DeepRecEnv(resources=resources, **env_kwargs)
    r = env.res.retriever
    r.clear_cache()
    env.PREFETCH = 4
    env.reset(options={"example": 5})  # block 4..7 of the env's episodes
    cached = [r.cached(env.split.history(int(j), r.max_len)) for j in env.examples[:8]]
    assert cached[4:8] == [True] * 4 and not any(cached[:4])
