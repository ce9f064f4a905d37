import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from deeprec_env.metrics import MISS, full_ranks, ndcg_at_k, rank_metrics, recall_at_k


def test_hand_computed():
    ranks = np.array([0, 1, 9, 10, MISS])
    assert recall_at_k(ranks, 1) == 0.2
    assert recall_at_k(ranks, 10) == 0.6
    expected = (1 + 1 / np.log2(3) + 1 / np.log2(11)) / 5
    assert abs(ndcg_at_k(ranks, 10) - expected) < 1e-12
    m = rank_metrics(ranks)
    assert set(m) == {"recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10"}
    assert recall_at_k(np.array([]), 5) == 0.0


def test_full_ranks_ties_by_id_and_exclusion():
    scores = np.array([[0.0, 1.0, 2.0, 2.0, 0.5]])
    assert full_ranks(scores, np.array([3]))[0] == 1  # item 2 ties and has a lower id
    assert full_ranks(scores, np.array([2]))[0] == 0
    assert full_ranks(scores, np.array([3]), exclude=[np.array([2])])[0] == 0
    assert full_ranks(scores, np.array([3]), exclude=[np.array([3])])[0] == MISS


@given(st.lists(st.integers(0, 5), min_size=3, max_size=12), st.data())
def test_full_ranks_matches_sort(values, data):
    scores = np.array([[0.0, *values]], dtype=float)
    target = data.draw(st.integers(1, len(values)))
    order = sorted(range(1, len(values) + 1), key=lambda i: (-scores[0, i], i))
    assert full_ranks(scores, np.array([target]))[0] == order.index(target)
