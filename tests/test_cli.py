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
    assert main(["trm-train", "--dataset", "synthetic", "--out", "x", "--d-model", "10", "--n-heads", "3"]) == 2
    err = capsys.readouterr().err
    assert "d_model=10 is not divisible" in err and "Traceback" not in err and "--debug" in err
    with pytest.raises(ValueError, match="d_model=10 is not divisible"):
        main(["trm-train", "--dataset", "synthetic", "--out", "x", "--d-model", "10", "--n-heads", "3", "--debug"])


def test_data_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "x.inter"
    bad.write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\tnan\n")
    assert main(["data-summary", "--dataset", "atomic", "--path", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"deeprec data-summary: error: {bad}:2: timestamp 'nan' is not a finite number"


def test_serve_options_are_checked_before_serving(capsys):
    assert main(["serve", "--dataset", "synthetic", "--max-sessions", "0"]) == 2
    assert "--max-sessions 0; must be >= 1" in capsys.readouterr().err
    for port in ("0", "65536"):
        assert main(["serve", "--dataset", "synthetic", "--port", port]) == 2
        assert f"--port {port}; must be in 1..65535" in capsys.readouterr().err
    assert main(["serve", "--dataset", "synthetic", "--max-calls", "0"]) == 2
    err = capsys.readouterr().err
    assert "max_calls" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["serve", "--stage", "nope"])
    assert "invalid choice" in capsys.readouterr().err
