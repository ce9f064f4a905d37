import numpy as np
import pytest
import torch

from deeprec_env.data import cache_dir
from deeprec_env.embed import TextEncoder, item_text_embeddings


def test_unit_norm_and_order(tiny_encoder):
    texts = ["drama", "a funny comedy movie", "dark horror", "old romance"]
    emb = tiny_encoder.encode(texts)
    assert emb.shape == (4, tiny_encoder.dim) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    for i, t in enumerate(texts):
        assert np.allclose(tiny_encoder.encode([t])[0], emb[i], atol=1e-5)


def test_type_errors(tiny_encoder):
    with pytest.raises(TypeError, match="sequence of str"):
        tiny_encoder.encode("drama")
    with pytest.raises(TypeError, match="must be str"):
        tiny_encoder.encode(["drama", 3])


def test_item_embeddings_cached(tiny_ds, tiny_encoder):
    a = item_text_embeddings(tiny_ds.catalog, tiny_encoder)
    assert a.shape == (tiny_ds.catalog.num_embeddings, tiny_encoder.dim)
    assert np.all(a[0] == 0)
    files = list((cache_dir() / "embeddings").glob("*.npy"))
    assert len(files) == 1
    b = item_text_embeddings(tiny_ds.catalog, tiny_encoder)
    assert np.array_equal(a, b)


def test_missing_model_path_is_clear(tmp_path):
    with pytest.raises(OSError):
        TextEncoder(tmp_path / "no-such-model")


@pytest.mark.slow
def test_embedded_minilm_matches_sentence_transformers():
    enc = TextEncoder()
    v = enc.encode(["A man is eating food.", "A man is eating a piece of bread."])
    assert enc.dim == 384
    # sentence-transformers/all-MiniLM-L6-v2 gives 0.7553 for this pair
    assert abs(float(v[0] @ v[1]) - 0.7553) < 2e-3


TEXTS = ["drama", "a funny comedy movie about old romance", "dark horror", "light", "sad new action thriller movies"]


def test_onnx_backend_matches_torch(tiny_encoder_path, tiny_encoder):
    pytest.importorskip("onnxruntime")
    enc = TextEncoder(tiny_encoder_path, backend="onnx", cache_size=0)
    assert enc.id == tiny_encoder.id  # same function, so caches are shared
    want = TextEncoder(tiny_encoder_path, cache_size=0).encode(TEXTS)
    np.testing.assert_allclose(enc.encode(TEXTS), want, atol=1e-5)  # one padded batch
    for t, w in zip(TEXTS, want, strict=True):  # single texts of other lengths than the export's sample
        np.testing.assert_allclose(enc.encode([t])[0], w, atol=1e-5)
    files = list((cache_dir() / "onnx").glob("*.onnx"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = TextEncoder(tiny_encoder_path, backend="onnx")  # reuses the exported file
    assert files[0].stat().st_mtime_ns == stamp
    np.testing.assert_allclose(again.encode(TEXTS), want, atol=1e-5)


def test_backend_errors(tiny_encoder_path, monkeypatch):
    import sys

    import torch

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the fast extra were not installed
    with pytest.raises(ImportError, match=r"deeprec-env\[fast\]"):
        TextEncoder(tiny_encoder_path, backend="onnx")

    with pytest.raises(ValueError, match="backend='tensorrt'"):
        TextEncoder(tiny_encoder_path, backend="tensorrt")
    with pytest.raises(ValueError, match="float32 model on CPU"):
        TextEncoder(tiny_encoder_path, backend="onnx", dtype=torch.bfloat16)


def test_text_without_tokens_embeds_to_zero(tiny_encoder):
    out = tiny_encoder.encode(["", "comedy"])
    assert not out[0].any() and abs(float(np.linalg.norm(out[1])) - 1) < 1e-5
    assert not tiny_encoder.encode([""])[0].any()  # a batch where no text has a token


def test_encoder_id_follows_the_weights_not_the_folder(tiny_encoder_path, tmp_path):
    import shutil

    from deeprec_env.embed import TextEncoder

    copy = shutil.copytree(tiny_encoder_path, tmp_path / "elsewhere")
    a, b = TextEncoder(tiny_encoder_path), TextEncoder(copy)
    assert a.id == b.id  # a second virtualenv (another install path) shares the caches
    assert TextEncoder(copy, max_length=16).id != a.id
    with torch.no_grad():
        b.model.embeddings.word_embeddings.weight[5] += 1.0
    from deeprec_env.embed import _weights_digest

    assert _weights_digest(b.model) != _weights_digest(a.model)


def test_long_texts_and_lone_surrogates(tiny_encoder):
    assert tiny_encoder.max_length == 64  # the tiny model's position limit, below the default 128
    long = tiny_encoder.encode(["comedy " * 500])
    assert abs(float(np.linalg.norm(long[0])) - 1) < 1e-5
    odd = tiny_encoder.encode(["drama \udbc2"])
    assert np.allclose(odd, tiny_encoder.encode(["drama ?"]))
