"""Caches and checkpoints: atomic, validated when read, rebuilt when corrupt, never someone else's files."""

import multiprocessing
import os
import stat

import numpy as np
import pytest

from deeprec_env.data import cache_dir, load_dataset
from deeprec_env.fixtures import TINY_TRM
from deeprec_env.storage import atomic_write, clean_stale_temps, prepare_folder
from deeprec_env.trm import TRM_FILES, TRMConfig, load_or_train_trm, load_trm, save_trm, trm_cache_path

TINY = TRMConfig(**{**TINY_TRM, "max_epochs": 1})


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_dataset_cache_is_rebuilt(tmp_path, caplog):
    ml = load_dataset("ml-100k")
    (entry,) = (cache_dir() / "datasets").glob("ml-100k-*.npz")
    _truncate(entry)
    again = load_dataset("ml-100k")
    assert again.fingerprint == ml.fingerprint
    assert "unreadable" in caplog.text and entry.is_file()


def test_truncated_trm_weights_are_rebuilt(tiny_ds, tiny_encoder, caplog):
    model = load_or_train_trm(tiny_ds, TINY, tiny_encoder, progress=False)
    path = trm_cache_path(tiny_ds, TINY, tiny_encoder)
    _truncate(path / "model.safetensors")
    with pytest.raises(ValueError, match="corrupt or partly written"):
        load_trm(path, tiny_ds)
    again = load_or_train_trm(tiny_ds, TINY, tiny_encoder, progress=False)
    assert "unreadable" in caplog.text
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert np.array_equal(a.numpy(), b.numpy())  # deterministic training: the same TRM again
    load_trm(path, tiny_ds)  # the rebuilt entry is whole


def test_truncated_onnx_export_is_rebuilt(tiny_encoder_path, caplog):
    pytest.importorskip("onnxruntime")
    from deeprec_env.embed import TextEncoder

    a = TextEncoder(tiny_encoder_path, backend="onnx").encode(["drama"])
    (entry,) = (cache_dir() / "onnx").glob("*.onnx")
    _truncate(entry, 0.3)
    b = TextEncoder(tiny_encoder_path, backend="onnx").encode(["drama"])
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert "unreadable" in caplog.text


def _build(args):
    folder, encoder_path = args
    os.environ["DEEPREC_CACHE"] = folder
    from deeprec_env.data import synthetic
    from deeprec_env.embed import TextEncoder

    ds = synthetic(n_users=60, n_items=40, seed=0)
    model = load_or_train_trm(ds, TINY, TextEncoder(encoder_path), progress=False)
    return float(sum(float(v.double().sum()) for v in model.state_dict().values()))


def test_two_processes_building_one_cache_entry(tmp_path, tiny_encoder_path, tiny_ds, tiny_encoder):
    folder = str(tmp_path / "shared_cache")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        sums = pool.map(_build, [(folder, str(tiny_encoder_path))] * 2)
    assert sums[0] == sums[1]
    os.environ["DEEPREC_CACHE"] = folder
    path = trm_cache_path(tiny_ds, TINY, tiny_encoder)
    assert sorted(p.name for p in path.iterdir()) == sorted(TRM_FILES)  # one whole entry, no temp files
    load_trm(path, tiny_ds)


def test_save_refuses_a_folder_with_other_files(tmp_path, tiny_ds, tiny_encoder):
    model = load_or_train_trm(tiny_ds, TINY, tiny_encoder, progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save_trm(model, tmp_path, tiny_ds)
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "config.json").exists()
    save_trm(model, tmp_path / "trm", tiny_ds)
    save_trm(model, tmp_path / "trm", tiny_ds)  # a checkpoint folder is overwritten
    with pytest.raises(FileExistsError, match="is a file"):
        save_trm(model, tmp_path / "notes.txt", tiny_ds)


def test_trm_train_cli_leaves_other_files_alone(tmp_path, tiny_encoder_path, capsys):
    from deeprec_env.cli import main

    (tmp_path / "keep.md").write_text("x")
    assert (
        main(["trm-train", "--dataset", "synthetic", "--out", str(tmp_path), "--encoder", str(tiny_encoder_path)]) == 2
    )
    assert "keep.md" in capsys.readouterr().err
    assert (tmp_path / "keep.md").read_text() == "x"


def test_stale_temp_files_are_cleaned_and_live_ones_kept(tmp_path):
    dead = multiprocessing.get_context("fork").Process(target=lambda: None)
    dead.start()
    dead.join()
    stale = tmp_path / f".model.safetensors.pid{dead.pid}.abc.tmp"
    live = tmp_path / f".model.safetensors.pid{os.getpid()}.abc.tmp"
    stale.write_text("half")
    live.write_text("being written")
    atomic_write(tmp_path / "x.json", lambda tmp: tmp.write_text("{}"))
    assert not stale.exists() and live.exists()
    assert clean_stale_temps(tmp_path) == 0


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_cache_files_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        path = atomic_write(tmp_path / "a.bin", lambda tmp: tmp.write_bytes(b"1"))
        folder = prepare_folder(tmp_path / "ckpt", (), "a test")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
