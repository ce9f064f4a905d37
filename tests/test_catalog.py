import pytest

from deeprec_env.catalog import Catalog, clean_text, normalise_title


@pytest.fixture
def cat():
    return Catalog.from_items(
        ["a", "b", "c", "d", "e"],
        ["Matrix, The (1999)", "Toy Story (1995)", "Toy Story (1995)", "Amélie (2001)", "Heat (1995)"],
        [("Sci-Fi",), ("Animation", "Comedy"), ("Animation",), ("Comedy", "Romance"), ("Crime",)],
    )


def test_number_and_padding(cat):
    assert cat.n_items == 5 and cat.num_embeddings == 6
    assert cat.number("c") == 3 and cat.raw_ids[0] == "<pad>"
    assert cat.number("zz", missing="none") is None
    with pytest.raises(KeyError, match="unknown raw item id 'zz'"):
        cat.number("zz")
    with pytest.raises(ValueError, match="item=6"):
        cat.check(6)


def test_ground_exact_normalised_fuzzy(cat):
    assert cat.ground("Matrix, The (1999)") == 1
    assert cat.ground("The Matrix") == 1
    assert cat.ground("the matrix (1999)!") == 1
    assert cat.ground("Toy Story (1995)") == 2  # duplicate titles resolve to the lowest id
    assert cat.ground("Amelie") == 4
    assert cat.ground("Toy Storey") == 2  # fuzzy
    assert cat.ground("Toy Storey", fuzzy_cutoff=1.01) is None
    assert cat.ground("Completely Unknown Movie") is None
    assert cat.ground("") is None and cat.ground("   ") is None
    with pytest.raises(TypeError):
        cat.ground(None)


def test_text_and_categories(cat):
    assert cat.text(2) == "Toy Story (1995). Categories: Animation, Comedy."
    assert cat.all_categories[:2] == ("Animation", "Comedy")
    assert cat.category_matrix.shape == (6, 5) and cat.category_matrix[2].sum() == 2
    assert "é" in cat.charset


def test_validation():
    with pytest.raises(ValueError, match="unique"):
        Catalog.from_items(["a", "a"], ["x", "y"], [(), ()])
    with pytest.raises(ValueError, match="same length"):
        Catalog(raw_ids=("<pad>", "a"), titles=("",), categories=((),))


def test_text_helpers():
    assert clean_text(" a&amp;b \n") == "a&b"
    assert normalise_title("Amélie, La (2001)") == "la amelie"
