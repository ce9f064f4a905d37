import json

import pytest

from deeprec_env.cli import main


def test_data_summary(capsys):
    assert main(["data-summary", "--dataset", "synthetic"]) == 0
    assert "users" in capsys.readouterr().out


def test_trm_train_saves_checkpoint(tmp_path, tiny_encoder_path, capsys):
    out = tmp_path / "trm"
    args = [
        "trm-train",
        "--dataset",
        "synthetic",
        "--out",
        str(out),
        "--encoder",
        str(tiny_encoder_path),
        "--d-model",
        "16",
        "--ffn-dim",
        "32",
        "--max-len",
        "12",
        "--max-epochs",
        "1",
        "--use-text",
        "false",
    ]
    assert main(args) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["config"]["use_text"] is False and meta["config"]["d_model"] == 16
    assert "saved" in capsys.readouterr().out


def test_bad_option_is_clear(capsys):
    with pytest.raises(SystemExit):
        main(["trm-train", "--out", "x", "--use-text", "maybe"])
    assert "not a boolean" in capsys.readouterr().err
    with pytest.raises(ValueError, match="d_model=10 is not divisible"):
        main(["trm-train", "--dataset", "synthetic", "--out", "x", "--d-model", "10", "--n-heads", "3"])
