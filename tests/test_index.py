import numpy as np
import pytest

from deeprec_env.index import IndexConfig, ItemIndex


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(vectors, q, k):
    s = q @ vectors[1:].T
    out = []
    for row in s:
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        out.append([j + 1 for j in order])
    return np.array(out)


def test_exact_matches_brute_force():
    rng = np.random.default_rng(0)
    v = unit(rng.normal(size=(301, 16))).astype(np.float32)
    q = unit(rng.normal(size=(7, 16))).astype(np.float32)
    ids, scores = ItemIndex(v).search(q, 20)
    assert np.array_equal(ids, brute(v, q, 20))
    assert np.all(np.diff(scores, axis=1) <= 1e-7)
    assert (ids > 0).all()


def test_ties_broken_by_item_id():
    v = np.zeros((11, 4), dtype=np.float32)
    v[1:, 0] = 1.0  # all items identical
    ids, _ = ItemIndex(v).search(np.array([[1, 0, 0, 0]], dtype=np.float32), 5)
    assert ids.tolist() == [[1, 2, 3, 4, 5]]


def test_exclusion_and_padding():
    rng = np.random.default_rng(1)
    v = unit(rng.normal(size=(6, 8))).astype(np.float32)
    q = v[[1, 2]]
    ids, scores = ItemIndex(v).search(q, 4, exclude=[[1], [2, 3]])
    assert 1 not in ids[0] and 2 not in ids[1] and 3 not in ids[1]
    assert ids[0, 0] != 0
    ids, scores = ItemIndex(v).search(q, 10, exclude=[[1], []])
    assert ids.shape == (2, 10)
    assert (ids[0, 4:] == 0).all() and np.isneginf(scores[0, 4:]).all()
    assert (ids[1, :5] > 0).all()


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_recall(kind):
    rng = np.random.default_rng(2)
    centers = rng.normal(size=(20, 16))
    v = unit(centers[rng.integers(0, 20, 3000)] + 0.3 * rng.normal(size=(3000, 16))).astype(np.float32)
    v = np.vstack([np.zeros((1, 16), np.float32), v])
    q = v[rng.integers(1, 3001, 50)] + 0.01
    exact, _ = ItemIndex(v).search(q, 20)
    approx, _ = ItemIndex(v, IndexConfig(kind=kind, ivf_nprobe=8)).search(q, 20)
    recall = np.mean([len(set(a) & set(e)) / 20 for a, e in zip(approx, exact, strict=True)])
    assert recall > 0.9


def test_bad_arguments():
    v = np.ones((5, 4), dtype=np.float32)
    index = ItemIndex(v)
    with pytest.raises(ValueError, match="k=0"):
        index.search(v[:1], 0)
    with pytest.raises(ValueError, match=r"queries must be \(B, 4\)"):
        index.search(np.ones((1, 3)), 2)
    with pytest.raises(ValueError, match="exclude has 2 rows"):
        index.search(v[:1], 2, exclude=[[], []])
    with pytest.raises(ValueError, match="NaN"):
        ItemIndex(np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="kind='lsh'"):
        IndexConfig(kind="lsh")


def test_search_leaves_thread_setting_alone():
    import torch

    before = torch.get_num_threads()
    index = ItemIndex(unit(np.random.default_rng(0).normal(size=(50, 8))).astype(np.float32))
    index.search(np.ones((1, 8), np.float32), 5)
    assert torch.get_num_threads() == before
