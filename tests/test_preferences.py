import numpy as np
import pytest

from deeprec_env.data import synthetic
from deeprec_env.preferences import (
    PreferenceBank,
    PreferenceMix,
    co_occurrence_neighbours,
    era_preference,
    item_years,
    like_preference,
    right_aligned_contexts,
    title_words,
    top_history_categories,
    wrong_categories,
)


@pytest.fixture(scope="module")
def ds():
    return synthetic(n_users=60, n_items=40, seed=0)


@pytest.fixture(scope="module")
def bank(ds):
    return PreferenceBank.build(ds.catalog, ds.train_sequences())


def only(source: str) -> PreferenceMix:
    return PreferenceMix(**{f: 0.0 for f in PreferenceMix().weights} | {source: 1.0})


def texts_of(bank, rows):
    return [bank.texts[r - 1] if r else "" for r in rows]


def draw(bank, ds, source, n=200, seed=0):
    rng = np.random.default_rng(seed)
    seqs = ds.train_sequences()
    users = rng.integers(0, ds.n_users, n)
    contexts = np.zeros((n, 6), dtype=np.int64)
    targets = np.zeros(n, dtype=np.int64)
    for r, u in enumerate(users):
        s = seqs[u]
        end = int(rng.integers(1, len(s)))
        ctx = s[max(0, end - 6) : end]
        contexts[r, 6 - len(ctx) :] = ctx
        targets[r] = s[end]
    return targets, contexts, texts_of(bank, bank.sample(only(source), targets, contexts, np.random.default_rng(seed)))


def test_bank_phrasings(ds, bank):
    cat = ds.catalog
    assert len(set(bank.texts)) == len(bank.texts)
    for j, c in enumerate(cat.all_categories):
        phrasings = texts_of(bank, bank.category_rows[j])
        assert phrasings[0] == c and all(c.lower() in p for p in phrasings[1:])
    for i in range(1, cat.num_embeddings):
        assert texts_of(bank, bank.like_rows[i])[0] == f"like {cat.titles[i]}"
        assert set(texts_of(bank, [bank.set_rows[i]])[0].split("; ")) == set(cat.categories[i])
    assert bank.eras == ()  # synthetic titles carry no year


def test_target_sources_describe_the_target(ds, bank):
    cat = ds.catalog
    targets, _, texts = draw(bank, ds, "target_categories")
    for t, text in zip(targets, texts, strict=True):
        assert any(c.lower() in text.lower() for c in cat.categories[t]), (text, cat.categories[t])
        others = set(cat.all_categories) - set(cat.categories[t])
        assert not any(c in text.split("; ") for c in others)
    targets, _, texts = draw(bank, ds, "target_like")
    for t, text in zip(targets, texts, strict=True):
        liked = {cat.titles[i] for i in bank.neighbours[t] if i}
        assert not text or any(title in text for title in liked)
    targets, _, texts = draw(bank, ds, "target_words")
    for t, text in zip(targets, texts, strict=True):
        assert not text or text in title_words(cat.titles[t])


def test_history_sources_describe_the_history(ds, bank):
    cat = ds.catalog
    _, contexts, texts = draw(bank, ds, "history_like")
    for ctx, text in zip(contexts, texts, strict=True):
        recent = [cat.titles[i] for i in ctx[-3:] if i]
        assert any(title in text for title in recent)
    _, contexts, texts = draw(bank, ds, "history_categories")
    for ctx, text in zip(contexts, texts, strict=True):
        in_history = {c for i in ctx for c in cat.categories[i]}
        assert any(c.lower() in text.lower() for c in in_history), (text, in_history)


def test_sampling_is_seeded_and_mixes_sources(ds, bank):
    targets, contexts, _ = draw(bank, ds, "noise")
    a = bank.sample(PreferenceMix(), targets, contexts, np.random.default_rng(1))
    b = bank.sample(PreferenceMix(), targets, contexts, np.random.default_rng(1))
    assert np.array_equal(a, b) and a.max() <= len(bank.texts) and a.min() >= 0
    assert len(set(a.tolist())) > 20  # many different texts
    none = bank.sample(only("none"), targets, contexts, np.random.default_rng(1))
    assert not none.any()


def test_neighbours_and_contexts_by_hand():
    nb = co_occurrence_neighbours([np.array([1, 2, 3]), np.array([2, 3]), np.array([3, 2])], 5, k=2, window=1)
    assert nb[2].tolist() == [3, 1] and nb[3].tolist() == [2, 0] and nb[4].tolist() == [0, 0]
    ctx = right_aligned_contexts(np.array([[0, 5, 6]]))
    assert ctx[0].tolist() == [[0, 0, 0], [0, 0, 5], [0, 5, 6]]


def test_probe_builders(ds):
    cat = ds.catalog
    assert wrong_categories(cat, 1) and not set(wrong_categories(cat, 1, 2).split("; ")) & set(cat.categories[1])
    hist = np.array([1, 1, 2])
    top = top_history_categories(cat, hist)
    assert top in cat.categories[1] and top_history_categories(cat, hist, 5).split("; ")[0] == top
    assert like_preference(cat, np.array([[0], [2]]), 1) == f"like {cat.titles[2]}"
    years = np.array([0, 1974, 0])
    assert era_preference(years, 1) == "from the 1970s" and era_preference(years, 2) == ""


def test_item_years():
    from deeprec_env.catalog import Catalog

    cat = Catalog.from_items(["a", "b"], ["Heat (1995)", "No Year"], [("Crime",), ()])
    assert item_years(cat).tolist() == [0, 1995, 0]


@pytest.mark.parametrize(
    "bad", [{"noise": -1.0}, {"noise": float("nan")}, {"noise": True}, dict.fromkeys(PreferenceMix().weights, 0.0)]
)
def test_mix_validation(bad):
    with pytest.raises((ValueError, TypeError), match="PreferenceMix"):
        PreferenceMix(**bad)
