import json
import os
import shutil
from unittest.mock import patch

import numpy as np
import pytest
import torch

from deeprec_env.rewards import STAGES


def test_trm_quality_smoke(tmp_path, tiny_encoder_path, capsys):
    from benchmarks import trm_quality

    trm_quality.main(["--smoke", "--encoder", str(tiny_encoder_path), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Protocol:" in out and "full ranking" in out and "PreferenceTRM" in out
    data = json.loads((tmp_path / "trm_quality_smoke.json").read_text())
    assert {r["model"].split(",")[0] for r in data["rows"]} == {"popularity", "SASRec (ID only)", "PreferenceTRM"}
    assert data["protocol"]["history items"] == "not masked"
    assert data["protocol"]["trm"].startswith("weights ") and data["protocol"]["trm"] in out  # which TRM it was
    from benchmarks.probes import BEST_OF, HONEST

    probes = {r["probe"]: r for r in data["probes"]}
    assert probes["none"]["top10 hit changed"] == 0
    for k in ("ndcg@10", "recall@10", "ndcg@20"):  # the best rank per example beats every probe it picks from
        assert probes[BEST_OF][k] >= max(probes[name][k] for name in HONEST) - 1e-12
    best, none = probes[BEST_OF], probes["none"]  # none is among the picks: the best only turns misses into hits
    assert best["recall@10"] - none["recall@10"] == pytest.approx(best["top10 hit changed"] / best["examples"])


def test_trm_sweep_smoke_ranks_settings_by_validation(tmp_path, tiny_encoder_path):
    from benchmarks import trm_sweep

    trm_sweep.main(["--smoke", "--encoder", str(tiny_encoder_path), "--out", str(tmp_path), "default",
                    "temperature=0.1,dropout=0.2"])  # fmt: skip
    rows = json.loads((tmp_path / "trm_sweep_smoke.json").read_text())["rows"]
    assert sorted(r["setting"] for r in rows) == ["default", "temperature=0.1,dropout=0.2"]
    crit = [r["valid ndcg (criterion)"] for r in rows]
    assert crit == sorted(crit, reverse=True)


def test_trm_sweep_rejects_bad_settings():
    from benchmarks.trm_sweep import configs, parse_setting
    from deeprec_env.trm import TRMConfig

    assert parse_setting("lr=0.005,item_text_out=true,fusion=add") == {"lr": 0.005, "item_text_out": True,
                                                                       "fusion": "add"}  # fmt: skip
    for bad in ("lr", "nope=1", "fusion=mul", "item_text_out=maybe", "lr=fast", "preferences=x"):
        with pytest.raises(ValueError):
            parse_setting(bad)
    with pytest.raises(ValueError):  # a value TRMConfig itself rejects fails before anything trains
        configs(["default", "temperature=-1"], TRMConfig())


def test_retrieval_speed_smoke(tmp_path, tiny_encoder_path, capsys):
    from benchmarks import retrieval_speed

    retrieval_speed.main(["--smoke", "--encoder", str(tiny_encoder_path), "--out", str(tmp_path)])
    data = json.loads((tmp_path / "retrieval_speed_smoke.json").read_text())
    rows = data["rows"]
    # ml-100k exact x {torch, onnx}, 1M exact x torch, 1M IVF x {torch, onnx}
    assert [(r["index"][:3], r["encoder backend"]) for r in rows] == [
        ("exa", "torch"), ("exa", "onnx"), ("exa", "torch"), ("IVF", "torch"), ("IVF", "onnx")]  # fmt: skip
    assert all(r["p50_ms (batch 1)"] > 0 for r in rows)
    assert 0.0 <= rows[3]["recall@20 vs exact"] <= 1.0
    assert rows[3]["recall@20 vs exact"] == rows[4]["recall@20 vs exact"]  # one index, two backends
    assert all(r["top-20 overlap vs torch backend"] >= 0.95 for r in rows)  # the backends compute the same vectors


def test_env_speed_smoke(tmp_path, tiny_encoder_path, capsys):
    from benchmarks import env_speed

    env_speed.main(["--smoke", "--encoder", str(tiny_encoder_path), "--out", str(tmp_path)])
    data = json.loads((tmp_path / "env_speed_smoke.json").read_text())
    assert data["steps_per_s_single"] > 0 and data["steps_per_s_vector"] > 0
    assert data["own_work"]["approx_tokens"] > 10_000
    assert data["http"]["steps_per_s_http"] > 0 and data["http"]["ratio_steps"] > 0


def test_llm_speed_smoke(tiny_lm_path, env_kwargs, resources):
    from agents.llm import LLMPolicy
    from benchmarks.llm_speed import measure

    rows = measure(LLMPolicy(str(tiny_lm_path), max_new_tokens=4), {**env_kwargs, "invalid_action": "feedback"},
                   episodes=2)  # fmt: skip
    assert [r["episodes"] for r in rows] == [2, 2, 2] and all(r["s/episode"] > 0 for r in rows)
    assert rows[2]["same segments as model.generate"] == "yes"


def test_report_section_reproduces_result_files(tmp_path):
    from benchmarks.report import section

    (tmp_path / "trm_quality.md").write_text("## TRM quality\n\n| a |\n|---|\n| 1 |\n")
    text = section(tmp_path)
    assert "python -m benchmarks.trm_quality" in text and "### TRM quality" in text and "| 1 |" in text


def test_readme_and_docs_results_match_result_files():
    from benchmarks.report import PAGES, current_section, deterministic, page_section

    for page in PAGES:
        expected = deterministic(page_section(page).strip())
        assert deterministic(current_section(page)) == expected, f"stale {page.name}: run python -m benchmarks.report"


def test_readme_comparison_ignores_wall_times_only():
    from benchmarks.report import deterministic

    table = "### Agent comparison\n\n| agent | ndcg@10 | seconds |\n|---|---|---|\n| trm-only | 0.0667 | 0.0012 |\n"
    assert deterministic(table) == deterministic(table.replace("0.0012", "0.0031"))  # a rerun's timing
    assert deterministic(table) != deterministic(table.replace("0.0667", "0.0668"))  # a metric changed
    speed = "### Environment speed\n\n| measure | value |\n|---|---|\n| env steps/s | 1368 |\n- episodes: 256\n"
    assert deterministic(speed) == deterministic(speed.replace("1368", "4476"))


def test_curriculum_cpu_smoke(tmp_path, tiny_lm_path, tiny_encoder_path, capsys):
    pytest.importorskip("peft")
    from benchmarks import curriculum_cpu

    out, export = tmp_path / "res", tmp_path / "adapter"
    argv = ["--smoke", "--model", str(tiny_lm_path), "--encoder", str(tiny_encoder_path), "--out", str(out),
            "--run", str(tmp_path / "run"), "--export", str(export), "--gradient-checkpointing"]  # fmt: skip
    curriculum_cpu.main(argv)
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["rec"]  # stage 1 skipped: stage 2 continues the warm start's adapter
    text = (out / "README.md").read_text()
    assert "python -m benchmarks.curriculum_cpu --smoke" in text and "| rec |" in text
    val = json.loads((out / "validation.json").read_text())
    assert val["users"] == len(val["before"]) == len(val["after"]) == 3
    assert "over 3 users" in text  # the paired interval
    trm_only = next(r for r in val["scripted"] if r["agent"] == "trm-only")
    vs = float(trm_only["LLM after - agent (95% CI)"].split()[0])  # the LLM's paired difference to trm-only
    assert vs == pytest.approx(np.mean([r["ndcg@10"] for r in val["after"]]) - trm_only["ndcg@10"], abs=1e-4)
    assert "| agent | ndcg@10 | recall@10 | LLM before - agent (95% CI) | LLM after - agent (95% CI) |" in text
    changed = val["changed"]
    assert f"NDCG@10 per user: {changed['better']} better, {changed['worse']} worse" in text
    assert val["trm"].startswith("weights ") and f"- trm: {val['trm']}" in text  # which TRM the run had
    assert "groups (one user's 2 samples each); by component: " in text and "of 2 sampled episodes hit" in text
    assert (out / "curves.png").is_file() and (out / "warmstart.jsonl").is_file()
    assert "- wall clock: " in text and "cache at start: " in text  # a fresh run folder: the command is timed
    settings = json.loads((out / "settings.json").read_text())
    assert settings["timing"]["seconds"] > 0
    assert settings["stage"]["gradient_checkpointing"] and settings["warm_start"]["gradient_checkpointing"]
    assert "token positions, gradient checkpointing" in text or "trajectories, gradient checkpointing" in text
    assert settings["reward_weights"] == STAGES["rec"] and "weighted format 1, hit 1, rank 1, point 1" in text
    # the exported adapter: config, weights and settings, loadable without the run folder
    assert {p.name for p in export.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "deeprec.json",
                                                  "README.md", "curves.png"}  # fmt: skip
    modules = json.loads((export / "adapter_config.json").read_text())["target_modules"]
    assert modules == sorted(modules)  # not peft's set order, which changes from process to process
    from agents.llm import load_causal_lm

    model, tok = load_causal_lm(str(export))
    assert tok.pad_token_id is not None and not hasattr(model, "peft_config")  # merged for inference
    clock = [x for x in text.splitlines() if x.startswith("- wall clock: ")]
    curriculum_cpu.main(argv)  # a finished run, re-run: results rewritten, the time is the invocation's that ran it
    assert [x for x in (out / "README.md").read_text().splitlines() if x.startswith("- wall clock: ")] == clock
    (tmp_path / "run" / "timing.json").unlink()  # as after a killed first invocation: no run's time to report
    curriculum_cpu.main(argv)
    assert "wall clock" not in (out / "README.md").read_text()
    # another point weight and difficulty: a run of its own, not exported unless asked, its settings and command
    # in the results
    other = tmp_path / "res0"
    argv0 = ["--smoke", "--model", str(tiny_lm_path), "--encoder", str(tiny_encoder_path), "--out", str(other),
             "--run", str(tmp_path / "run0"), "--format-weight", "2", "--point-weight", "0",
             "--retrieval-hit-weight", "2",
             "--difficulty-top", "50", "--lr", "0.0005", "--kl-coef", "0.05", "--kl-reference", "adapter",
             "--train-segments", "answer", "--mask-history", "--steps", "2", "--group-size", "3",
             "--temperature", "0.9", "--micro-batch-tokens", "4000", "--share-prefix", "--prompt-history", "4",
             "--retrieval-k", "12", "--warmstart-episodes", "3", "--warmstart-epochs", "2",
             "--warmstart-teacher", "history-facet", "--train-users", "2", "--device", "cpu",
             "--dtype", "bfloat16"]  # fmt: skip
    curriculum_cpu.main(argv0)
    settings = json.loads((other / "settings.json").read_text())
    assert settings["stage"]["dtype"] == settings["warm_start"]["dtype"] == "bfloat16"  # the policy's, everywhere
    assert "(SmolLM2-135M-Instruct, bf16) + LoRA" in (other / "README.md").read_text()
    assert json.loads((out / "settings.json").read_text())["stage"]["dtype"] == "float32"
    assert settings["steps"]["rec"] == 2 and len((other / "log.jsonl").read_text().splitlines()) == 2
    assert settings["stage"]["micro_batch_tokens"] == 4000 and settings["stage"]["share_prefix"]
    assert not settings["stage"]["gradient_checkpointing"] and not settings["warm_start"]["gradient_checkpointing"]
    assert not json.loads((out / "settings.json").read_text())["stage"]["share_prefix"]
    assert settings["reward_weights"] == {**STAGES["rec"], "format": 2.0, "point": 0.0, "retrieval_hit": 2.0}
    assert settings["stage"]["difficulty_top"] == 50
    assert (
        settings["stage"]["train_users"] == 2
        and json.loads((out / "settings.json").read_text())["stage"]["train_users"] == 0
    )
    assert settings["stage"]["group_size"] == 3
    assert settings["stage"]["temperature"] == 0.9
    assert json.loads((out / "settings.json").read_text())["stage"]["temperature"] == 0.7
    assert json.loads((out / "settings.json").read_text())["stage"]["group_size"] == 2
    assert settings["stage"]["kl_coef"] == 0.05 and settings["stage"]["kl_reference"] == "adapter"
    assert settings["stage"]["train_segments"] == "answer"
    assert json.loads((out / "settings.json").read_text())["stage"]["train_segments"] == "all"
    assert not json.loads((out / "settings.json").read_text())["stage"]["kl_coef"]
    # the KL to the warm start, whose adapter is the reference: exactly 0 until the policy first moves (the tiny model
    # fails every episode alike here: no update); a moved policy's KL is tested in tests/test_grpo.py
    log0 = [json.loads(x) for x in (other / "log.jsonl").read_text().splitlines()]
    unmoved = [r for i, r in enumerate(log0) if all(x["grad_norm"] == 0 for x in log0[:i])]
    assert unmoved and all(r["kl"] == 0.0 for r in unmoved) and all(r["kl"] >= 0 for r in log0)
    assert (settings["stage"]["prompt_history"], settings["stage"]["retrieval_k"]) == (4, 12)
    assert (settings["warm_start"]["prompt_history"], settings["warm_start"]["retrieval_k"]) == (4, 12)
    assert (settings["warm_start"]["episodes"], settings["warm_start"]["epochs"]) == (3, 2)
    assert settings["warm_start"]["teacher"] == "history-facet"
    assert (
        "SFT on 3 history-facet (1, 2 or 3 calls, drawn per transcript) transcripts"
        in (other / "README.md").read_text()
    )
    assert json.loads((out / "settings.json").read_text())["warm_start"]["teacher"] == "history-top-category-unseen"
    demos = json.loads((tmp_path / "run0" / "warmstart" / "checkpoint" / "trainer_state.json").read_text())
    assert len((other / "warmstart.jsonl").read_text().splitlines()) == 2 * -(-demos["demonstrations"] // 2)
    smoke_warm = json.loads((out / "settings.json").read_text())["warm_start"]
    assert (smoke_warm["episodes"], smoke_warm["epochs"]) == (2, 1)
    assert settings["stage"]["lr"] == 0.0005 and json.loads((out / "settings.json").read_text())["stage"]["lr"] == 2e-4
    assert settings["mask_history"] and not json.loads((out / "settings.json").read_text())["mask_history"]
    text = (other / "README.md").read_text()
    flags = "--kl-coef 0.05 --kl-reference adapter --train-segments answer --mask-history"
    assert flags in text
    assert "format 2, hit 1, rank 1, point 0, retrieval_hit 2" in text
    assert "whose target is in the TRM's top-50, only the first 2 of them (a fixed set)" in text
    assert "rollout batch, lr 0.0005," in text and "KL 0.05 (reference: the warm start's adapter beside" in text
    assert "passes of at most 2 trajectories and 4000 token positions, shared prompt prefix run once" in text
    assert "prompt prefix run once; the loss on each episode's last segment only (not the calls)" in text
    assert "in the TRM's top-50" in text and "history never retrieved" in text
    assert "sampling temperature 0.9" in text
    assert "1 user x 3 samples" in text and "groups (one user's 3 samples each)" in text
    assert "last 4 history items in the prompt, top-12 items per call" in text
    assert "| answer lines the prompt's history shows |" in text  # the part of ``seen`` an agent can avoid
    val = json.loads((other / "validation.json").read_text())
    assert all(0 <= r["shown"] <= r["seen"] for r in val["before"] + val["after"])
    # a larger (here: smaller) validation of the finished run: its own cache files, the first kept, its time said
    curriculum_cpu.main([*argv0, "--val-users", "2"])
    val = json.loads((other / "validation.json").read_text())
    assert val["users"] == len(val["after"]) == 2 and (tmp_path / "run0" / "val_after_step2_2.jsonl").is_file()
    assert len((tmp_path / "run0" / "val_after_step2_3.jsonl").read_text().splitlines()) == 3
    assert val["before"] == [json.loads(x) for x in (tmp_path / "run0" / "val_before_2.jsonl").read_text().splitlines()]
    clock = [x for x in (other / "README.md").read_text().splitlines() if x.startswith("- wall clock: ")]
    assert len(clock) == 1 and "for the run with 3 validation users" in clock[0] and "added the 2-user" in clock[0]
    # continued with more steps: the cached "after" validation is of the 2-step checkpoint; the 3-step one gets its own
    cached = tmp_path / "run0" / "val_after_step2_3.jsonl"
    cached.write_text(json.dumps({**val["after"][0], "ndcg@10": 123.0}) + "\n")  # a marker the rerun must not read
    curriculum_cpu.main([*argv0, "--steps", "3"])
    assert len((other / "log.jsonl").read_text().splitlines()) == 3
    val = json.loads((other / "validation.json").read_text())
    assert len(val["after"]) == 3 and all(r["ndcg@10"] <= 1 for r in val["after"])
    assert (tmp_path / "run0" / "val_after_step3_3.jsonl").is_file() and cached.is_file()
    with pytest.raises(ValueError, match="validation users asked; the validation episodes have 1 to"):
        curriculum_cpu.main([*argv0, "--val-users", "100000"])
    for bad in (
        ["--point-weight", "-1"],
        ["--retrieval-hit-weight", "-1"],
        ["--wasted-weight", "-1"],
        ["--wasted-weight", "nan"],
        ["--wasted-weight", "2.5"],  # above the format weight (2): breaking the format would pay
        ["--format-weight", "-1"],
        ["--format-weight", "nan"],
        ["--kl-coef", "-0.1"],
        ["--kl-coef", "nan"],
        ["--difficulty-top", "0"],
        ["--val-users", "0"],
        ["--lr", "0"],
        ["--temperature", "0"],
        ["--temperature", "nan"],
        ["--steps", "0"],
        ["--warmstart-episodes", "0"],
        ["--warmstart-epochs", "0"],
        ["--warmstart-teacher", "oracle-preference"],
        ["--warmstart-teacher", "hint-mix"],  # without the hint it reads
        ["--target-hint"],  # without the teacher that shows it
        ["--target-hint", "--warmstart-teacher", "hint-mix", "--warmstart-hint-share", "1.5"],
        ["--warmstart-teacher", "unseen-mix", "--warmstart-unseen-share", "-0.5"],  # reaches SFTArgs' check
        ["--prompt-history", "0"],
        ["--retrieval-k", "0"],
        ["--users-per-step", "0"],
        ["--group-size", "0"],
        ["--micro-batch", "0"],
        ["--micro-batch-tokens", "-1"],
        ["--train-users", "-1"],
        ["--gradient-checkpointing"],  # argv0 shares the prompt prefix
        ["--device", "gpu"],
        ["--device", "cuda:99"],  # no machine here has it: refused before the warm start
        ["--dtype", "float8"],
    ):
        with pytest.raises(SystemExit):
            curriculum_cpu.main([*argv0, *bad])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        curriculum_cpu.main([*argv0, "--wasted-weight", "2.5"])
    assert "--wasted-weight 2.5 > --format-weight 2.0: a malformed answer would score more" in capsys.readouterr().err


def test_curriculum_cpu_target_hint(tmp_path, tiny_lm_path, tiny_encoder_path):
    pytest.importorskip("peft")
    from benchmarks import curriculum_cpu

    out = tmp_path / "res"
    curriculum_cpu.main(["--smoke", "--model", str(tiny_lm_path), "--encoder", str(tiny_encoder_path), "--out",
                         str(out), "--run", str(tmp_path / "run"), "--target-hint", "--warmstart-teacher", "hint-mix",
                         "--warmstart-hint-share", "0.5"])  # fmt: skip
    settings = json.loads((out / "settings.json").read_text())
    assert settings["target_hint"] and settings["warm_start"]["teacher"] == "hint-mix"
    assert settings["warm_start"]["teacher_hint_share"] == 0.5
    text = (out / "README.md").read_text()
    assert "hint-mix (the call copies the prompt's hint in 0.5 of the transcripts" in text
    assert "the prompt names the target's categories (target_hint: privileged" in text
    assert "| calls copying the prompt's hint |" in text and "| oracle-preference |" in text
    val = json.loads((out / "validation.json").read_text())
    assert all(0 <= r["hint_calls"] <= r["hint_category_calls"] <= r["calls"] == len(r["preferences"])
               for r in val["before"] + val["after"])  # fmt: skip
    assert "| calls naming one of the hint's categories |" in text


def test_curriculum_validation_separates_format_from_ranking():
    from benchmarks.curriculum_cpu import CALL_ORDER, WELL_FORMED, compare_validation

    def rows(ndcg, fails):
        pairs = enumerate(zip(ndcg, fails, strict=True))
        return [{"example": i, "ndcg@10": x, "recall@10": float(x > 0), "format_fail": f, "calls": 1,
                 "hallucinated": 0, "seen": 0, "reward": 0.0} for i, (x, f) in pairs]  # fmt: skip

    before = rows([0.0, 0.5, 0.0, 1.0], [1, 0, 1, 0])  # two failed formats (misses)
    after = rows([1.0, 0.5, 0.0, 0.5], [0, 0, 1, 0])  # one fixed and hit; one well-formed user worse
    compared = compare_validation(before, after, seed=0)
    assert compared["changed"] == {"better": 1, "worse": 1}  # users 0 and 3; 1 and 2 unchanged
    val = {r["quantity"]: r for r in compared["rows"]}
    assert val["ndcg@10"]["after"] - val["ndcg@10"]["before"] == pytest.approx(0.125)
    assert val["ndcg@10"]["paired difference (95% CI)"].startswith("+0.1250") and "over 4 users" in val["ndcg@10"][
        "paired difference (95% CI)"]  # fmt: skip
    well = val[WELL_FORMED]  # users 1 and 3: the ranking alone got worse
    assert (well["before"], well["after"]) == (0.75, 0.5)
    assert well["paired difference (95% CI)"].startswith("-0.2500") and "over 2 users" in well[
        "paired difference (95% CI)"]  # fmt: skip
    assert "answer lines repeating an item" not in val  # an older cached file without the count: left out
    assert CALL_ORDER not in val  # nor the retrieval diagnostics
    assert val["reward"]["before"] == 0.0  # without weights: each row's own reward
    for r, fail in zip(before + after, [1, 0, 1, 0, 0, 0, 1, 0], strict=True):
        r["components"] = {"format": -float(fail), "wasted": -0.5}
    priced = {r["quantity"]: r for r in compare_validation(before, after, 0, {"format": 1.0, "wasted": 2.0})["rows"]}
    assert (priced["reward"]["before"], priced["reward"]["after"]) == (-1.5, -1.25)  # under the run's weights
    del before[0]["components"]  # a cached validation without them: its reward is not priced, the row is left out
    assert "reward" not in {r["quantity"] for r in compare_validation(before, after, 0, {"format": 1.0})["rows"]}


def test_curriculum_validation_separates_retrieval_from_ordering():
    from benchmarks.curriculum_cpu import CALL_ORDER, compare_validation

    def rows(ranks, retrieved):  # the answer's rank and the target's position in the call's list
        return [{"example": i, "ndcg@10": 1 / np.log2(r + 2) if r >= 0 else 0.0, "recall@10": float(r >= 0),
                 "format_fail": 0, "retrieved_rank": rr, "from_retrieved": 10}
                for i, (r, rr) in enumerate(zip(ranks, retrieved, strict=True))]  # fmt: skip

    before = rows([0, -1, -1, 3], [0, 12, -1, 3])  # the TRM's order kept; the target 13th or never retrieved
    after = rows([2, -1, 1, -1], [0, 12, 1, -1])  # user 0 reordered worse, 2 retrieved by a new call, 3 lost
    val = {r["quantity"]: r for r in compare_validation(before, after, seed=0)["rows"]}
    order = val[CALL_ORDER]
    assert order["before"] == pytest.approx(val["ndcg@10"]["before"])  # kept the order: the same NDCG
    assert order["after"] == pytest.approx((1 + 0 + 1 / np.log2(3) + 0) / 4)
    assert val["ndcg@10"]["after"] < order["after"]  # ordered worse than the calls' lists
    assert (val["target in a call's retrieved list"]["before"], val["target in a call's retrieved list"]["after"]) == (
        0.75, 0.75)  # fmt: skip
    assert val["answer lines a call retrieved"]["after"] == 10


def test_fuzz_smoke(tmp_path, tiny_encoder_path):
    from benchmarks import fuzz

    fuzz.main(["--smoke", "--actions", "120", "--encoder", str(tiny_encoder_path), "--out", str(tmp_path)])
    runs = json.loads((tmp_path / "fuzz_smoke.json").read_text())["runs"]
    assert set(runs) == {"end", "feedback"}
    assert all(r["actions"] == 120 and r["crashes"] == r["hangs"] == r["non_finite"] == 0 for r in runs.values())


def test_train_step_gpu_smoke(tmp_path, tiny_encoder_path, tiny_lm_path):
    from benchmarks import train_step_gpu

    train_step_gpu.main(["--smoke", "--modes", "full,lora,lora+ckpt", "--encoder", str(tiny_encoder_path),
                         "--tokenizer", str(tiny_lm_path), "--out", str(tmp_path)])  # fmt: skip
    rows = json.loads((tmp_path / "train_step_gpu_smoke.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["full", "LoRA r=16", "LoRA r=16, checkpointing"]
    assert all(r["episodes/step"] == 4 and r["step s"] > 0 and r["policy tokens"] > 0 for r in rows)
    # a step out of accelerator memory is a row saying so; the others still run
    real = train_step_gpu._one_step

    def oom_when_full(shape, mode, *a):
        if mode == "full":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(shape, mode, *a)

    with patch.object(train_step_gpu, "_one_step", oom_when_full):
        train_step_gpu.main(["--smoke", "--modes", "full,lora", "--encoder", str(tiny_encoder_path),
                             "--tokenizer", str(tiny_lm_path), "--out", str(tmp_path)])  # fmt: skip
    rows = json.loads((tmp_path / "train_step_gpu_smoke.json").read_text())["rows"]
    assert rows[0] == {"shape": "tiny", "mode": "full",
                       "note": "out of memory: CUDA out of memory. Tried to allocate 9.00 GiB"}  # fmt: skip
    assert rows[1]["mode"] == "LoRA r=16" and rows[1]["step s"] > 0 and rows[1]["note"] == ""
    assert "| tiny | full |  |" in (tmp_path / "train_step_gpu_smoke.md").read_text()  # empty cells, then the note
    for bad in (["--modes", "full,qlora"], ["--modes", "lora+ckpt", "--share-prefix"]):
        with pytest.raises(SystemExit):
            train_step_gpu.main(["--smoke", *bad])
    train_step_gpu.main(["--smoke", "--modes", "lora", "--share-prefix", "--encoder", str(tiny_encoder_path),
                         "--tokenizer", str(tiny_lm_path), "--out", str(tmp_path)])  # fmt: skip
    assert "share_prefix" in (tmp_path / "train_step_gpu_smoke.md").read_text()


def test_trl_grpo_formats_a_run_log(tmp_path, capsys):
    """benchmarks.trl_grpo --from-run: the SFT and GRPO rows of a TRL log (the run itself takes half an hour)."""
    import json

    from benchmarks import trl_grpo

    run = tmp_path / "run"
    run.mkdir()
    sft_log = [{"loss": 0.9, "mean_token_accuracy": 0.85, "step": 1}, {"train_runtime": 10.0, "step": 1}]
    log = [
        {"reward": -0.5, "reward_std": 0.4, "rewards/deeprec_format/mean": -0.75, "rewards/deeprec_hit/mean": 0.25,
         "completions/mean_length": 120.0, "grad_norm": 0.3, "step": 1},
    ]  # fmt: skip
    (run / "log.json").write_text(json.dumps({"env_kwargs": {"stage": "rec"}, "sft_log": sft_log, "log": log}))
    trl_grpo.main(["--from-run", str(run), "--seconds", "60", "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "trl_grpo.md").read_text()
    assert "| 1 | 0.9000 | 0.8500 |" in md
    assert "| step | reward | reward_std | format | hit | completion tokens | grad_norm |" in md
    assert "1.0 min" in md and "SFT rows from log.json" in md
    payload = json.loads((tmp_path / "out" / "trl_grpo.json").read_text())
    assert payload["grpo"][0]["format"] == -0.75 and payload["sft"][0]["loss"] == 0.9
    # a run from before the example saved its SFT log: the rows come from the trainer's console output
    (run / "log.json").write_text(json.dumps({"env_kwargs": {"stage": "rec"}, "log": log}))
    (run / "stdout.log").write_text("noise\r{'loss': '0.7', 'mean_token_accuracy': '0.9', 'epoch': '1'}\nmore\n")
    trl_grpo.main(["--from-run", str(run), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "trl_grpo.md").read_text()
    assert "| 1 | 0.7000 | 0.9000 |" in md and "console output" in md and "wall time: unknown" in md


def test_main_job_reads_how_the_trained_llm_was_made(tmp_path):
    from agents.llm import BUNDLED_ADAPTER as TRAINED
    from benchmarks.main import llm_settings

    assert llm_settings(None) == ({}, None) and llm_settings(str(tmp_path)) == ({}, None)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"args": {"prompt_history": 4, "retrieval_k": 7,
                                                                      "max_new_tokens": 99, "lr": 1.0}}))  # fmt: skip
    assert llm_settings(str(tmp_path)) == ({"prompt_history": 4, "retrieval_k": 7}, 99)
    made = {"episode": {"prompt_history": 5, "retrieval_k": 10, "dataset": "ml-100k"}, "max_new_tokens": 192}
    (tmp_path / "deeprec.json").write_text(json.dumps(made))
    assert llm_settings(str(tmp_path)) == ({"prompt_history": 5, "retrieval_k": 10}, 192)
    if (TRAINED / "deeprec.json").is_file():  # the bundled adapter: made with the CPU run's settings
        from benchmarks.curriculum_cpu import CPU_ARGS

        episode = {"prompt_history": CPU_ARGS.prompt_history, "retrieval_k": CPU_ARGS.retrieval_k}
        assert llm_settings(str(TRAINED)) == (episode, CPU_ARGS.max_new_tokens)


def test_main_job_rejects_a_missing_trained_model_before_any_work(tmp_path, capsys):
    from benchmarks import main

    with pytest.raises(SystemExit):
        main.main(["--trained", str(tmp_path / "nope"), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path)])
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # failed before training PPO or loading anything


def test_reward_probe_smoke(tmp_path, tiny_encoder_path):
    from benchmarks import reward_probe

    argv = ["--smoke", "--episodes", "6", "--encoder", str(tiny_encoder_path), "--out", str(tmp_path)]
    reward_probe.main(argv)
    rows = {r["answer"]: r for r in json.loads((tmp_path / "reward_probe_smoke.json").read_text())["rows"]}
    assert len(rows) == 6 and all(r["episodes"] == 6 for r in rows.values())
    for r in rows.values():  # the components add up: every answer is well-formed, so format is 0
        assert r["reward"] == pytest.approx(r["point"] + r["hit + rank"])
    reward_probe.main([*argv, "--point-repeats"])  # the reference's rule pays for the repeats
    again = {r["answer"]: r for r in json.loads((tmp_path / "reward_probe_smoke.json").read_text())["rows"]}
    repeated = "the first item written ten times"
    assert again[repeated]["point"] > rows[repeated]["point"]
    assert again["TRM order reversed"] == rows["TRM order reversed"]  # no repeats there: the same
    with pytest.raises(SystemExit):
        reward_probe.main(["--smoke", "--episodes", "0"])


def test_reward_probe_answers_copy_the_shown_history_first():
    from benchmarks.reward_probe import answers

    fresh = ["a", "b", "c", "h2"]  # h2 retrieved and shown: already moved last in fresh
    out = answers(fresh, dict.fromkeys(fresh, 0.0), dict.fromkeys(fresh, 0.0), ["h1", "h2"])
    assert out["the shown history's titles first, then TRM order"] == ["h1", "h2", "a", "b"]
    assert all(len(a) == len(fresh) for a in out.values()) and out["TRM order (shown history last)"] == fresh


def test_curriculum_signal_text_counts_groups_by_component():
    from benchmarks.curriculum_cpu import signal_text

    rows = [{"reward_hit": 0.25, "signal_groups": 1.0, "signal_groups_hit": 0.5, "signal_groups_point": 1.0,
             "signal_groups_format": 0.0},
            {"reward_hit": 0.0, "signal_groups": 0.5, "signal_groups_hit": 0.0, "signal_groups_point": 0.5,
             "signal_groups_format": 0.0}]  # fmt: skip
    weights = {"format": 1.0, "hit": 1.0, "point": 1.0}
    text = signal_text(rows, users_per_step=2, group_size=4, weights=weights)
    assert "differed inside 3 of the 4 groups" in text and "by component: point 3, hit 1." in text
    assert "2 of 16 sampled episodes hit" in text
    assert "by component: hit 1." in signal_text(rows, 2, 4, {**weights, "point": 0.0})  # weight 0 moves nothing
    assert signal_text([{"reward_hit": 0.0}], 2, 4, weights) == ""  # a log from before signal_groups
    assert "retrieving" not in text  # no retrieval_hit in the log
    for r, n in zip(rows, (0.5, 0.0), strict=True):
        r.update(reward_retrieval_hit=0.3, signal_groups_retrieval_hit=n)
    assert "calls differed in retrieving the target (`retrieval_hit`, weight 0 in this run) inside 1 group." in (
        signal_text(rows, 2, 4, weights))  # fmt: skip
    weighted = signal_text(rows, 2, 4, {**weights, "retrieval_hit": 1.0})  # counted once, among the components
    assert "retrieval_hit 1" in weighted and "retrieving" not in weighted


def test_update_speed_smoke(tmp_path, tiny_lm_path, tiny_encoder_path):
    from benchmarks import update_speed

    update_speed.main(["--smoke", "--model", str(tiny_lm_path), "--encoder", str(tiny_encoder_path), "--episodes",
                       "3", "--micro-batches", "1,3", "--lora-r", "2", "--out", str(tmp_path)])  # fmt: skip
    rows = json.loads((tmp_path / "update_speed_smoke.json").read_text())["rows"]
    assert [(r["micro-batch"], r["forward"]) for r in rows] == [(mb, way) for mb in (1, 3) for way in update_speed.WAYS]
    by_way = {r["forward"]: r for r in rows[4:]}
    plain, shared = by_way["whole rows, all logits"], by_way["prefix once"]
    assert shared["tokens through the model"] < plain["tokens through the model"]  # the instructions ran once
    assert len({r["tokens through the model"] for r in rows[:4]}) == 1  # one row: nothing to share
    for r in rows:
        if r["forward"] != "whole rows, all logits":
            assert float(r["max log-prob gap"]) < 1e-4 and float(r["grad norm gap"]) < 1e-4, r
    with pytest.raises(SystemExit):
        update_speed.main(["--micro-batches", "two"])


def test_update_memory_smoke(tmp_path, tiny_lm_path):
    from benchmarks import update_memory

    before = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    update_memory.main(["--smoke", "--model", str(tiny_lm_path), "--lora-r", "2", "--shapes", "1x16,2x32@8",
                        "--out", str(tmp_path)])  # fmt: skip
    rows = json.loads((tmp_path / "update_memory_smoke.json").read_text())["rows"]
    shapes = [(r["rows"], r["positions"], r["logits per row"], r["checkpointing"]) for r in rows]
    assert shapes == [(1, 16, "all", "off"), (1, 16, "all", "on"), (2, 64, "last 8", "off"), (2, 64, "last 8", "on")]
    assert all(r["GiB peak"] >= r["GiB after loading"] > 0 and r["seconds"] > 0 for r in rows)
    protocol = json.loads((tmp_path / "update_memory_smoke.json").read_text())["protocol"]
    assert "MALLOC_MMAP_THRESHOLD_=65536" in protocol["memory"]  # the measuring processes' allocator, said
    assert os.environ.get("MALLOC_MMAP_THRESHOLD_") == before  # this process's environment restored
    for bad in ("2by3", "0x10", "1x1", "", "2x10@0", "2x10@10", "2x10@x"):
        with pytest.raises(SystemExit):
            update_memory.main(["--shapes", bad])
    with pytest.raises(SystemExit):
        update_memory.main(["--checkpointing", "sometimes"])


def test_curriculum_runs_reproduce_each_runs_printed_difference():
    """The table recomputes every committed run's paired NDCG@10 difference as the run printed it, and is current."""
    from benchmarks.common import RESULTS
    from benchmarks.curriculum_runs import collect, report

    rows, unvalidated = collect(RESULTS)
    assert len(rows) >= 18
    for row in rows:
        readme = (RESULTS / row["results"] / "README.md").read_text()
        means = f"| ndcg@10 | {row['ndcg@10 before']:.4f} | {row['ndcg@10 after']:.4f} |"
        assert f"{means} {row['after - before (95% CI)']} over {row['users']} users |" in readme, row["results"]
    committed = json.loads((RESULTS / "curriculum_runs.json").read_text())
    assert committed["runs"] == json.loads(json.dumps(rows)), "stale: run python -m benchmarks.curriculum_runs"
    assert (RESULTS / "curriculum_runs.md").read_text() == report(rows, unvalidated) + "\n"


def test_curriculum_runs_table_of_synthetic_runs(tmp_path, capsys):
    from benchmarks.curriculum_cpu import compare_validation
    from benchmarks.curriculum_runs import main

    def episode(user, ndcg, fail=0.0):
        return {"example": user, "ndcg@10": ndcg, "recall@10": float(ndcg > 0), "format_fail": fail, "calls": 1.0}

    before = [episode(u, 0.0, fail=float(u == 0)) for u in range(20)]
    after = [episode(u, 0.5 if u < 15 else 0.0) for u in range(20)]
    run = tmp_path / "res" / "curriculum_cpu_up"
    run.mkdir(parents=True)
    val = {**compare_validation(before, after, seed=3), "before": before, "after": after,
           "scripted": [{"agent": "trm-only", "ndcg@10": 0.1}], "trm": "weights abc123 (docs/trm.md)"}  # fmt: skip
    (run / "validation.json").write_text(json.dumps(val))
    (run / "settings.json").write_text(json.dumps({"stage": {"seed": 3}, "steps": {"coldstart": 0, "rec": 5}}))
    cmd = "python -m benchmarks.curriculum_cpu --lr 1e-3 --run runs/x --out benchmarks/results/curriculum_cpu_up"
    (run / "README.md").write_text(f"# run\n\n```bash\n{cmd}\n```\n")
    (tmp_path / "res" / "curriculum_cpu_stopped").mkdir()
    (tmp_path / "res" / "curriculum_cpu_stopped" / "NOTES.md").write_text("# Two runs that did not finish\n\nmore\n")
    (tmp_path / "res" / "other").mkdir()  # not a curriculum_cpu folder: ignored
    out = tmp_path / "out"
    main(["--results", str(tmp_path / "res"), "--out", str(out)])
    data = json.loads((out / "curriculum_runs.json").read_text())
    (row,) = data["runs"]
    printed = next(r for r in val["rows"] if r["quantity"] == "ndcg@10")["paired difference (95% CI)"]
    assert printed == f"{row['after - before (95% CI)']} over 20 users" and row["moved"] == "up"
    assert (row["flags"], row["run folder"], row["trm"], row["stage-2 steps"]) == ("--lr 1e-3", "runs/x", "abc123", 5)
    assert (row["better / worse"], row["format failures"], row["trm-only"]) == ("15 / 0", "0.050 -> 0.000", 0.1)
    assert row["before - trm-only (95% CI)"] == row["after - trm-only (95% CI)"] == "-"  # the run did not print them
    assert data["unvalidated"] == [{"results": "curriculum_cpu_stopped", "note": "Two runs that did not finish"}]
    md = (out / "curriculum_runs.md").read_text()
    assert "1 validated run of an agent's prompt: the interval of after - before lies above 0 in 1, below 0 in 0" in md
    assert row["prompt"] == "agent's" and "target hint" not in md.split("Protocol:")[0]
    hinted = tmp_path / "res" / "curriculum_cpu_hint"  # the positive control: counted apart from the agents' runs
    shutil.copytree(run, hinted)
    (hinted / "settings.json").write_text(json.dumps({**json.loads((run / "settings.json").read_text()),
                                                      "target_hint": True}))  # fmt: skip
    main(["--results", str(tmp_path / "res"), "--out", str(out)])
    md = (out / "curriculum_runs.md").read_text()
    assert "1 validated run of an agent's prompt: the interval" in md
    assert "1 with the target's categories in the prompt (`--target-hint`: privileged" in md
    assert [r["prompt"] for r in json.loads((out / "curriculum_runs.json").read_text())["runs"]] == [
        "target hint", "agent's"]  # fmt: skip
    shutil.rmtree(hinted)
    assert "- `curriculum_cpu_stopped`: Two runs that did not finish" in md
    assert (out / "curriculum_runs.png").stat().st_size > 0
    (run / "README.md").write_text("# a README naming no command\n")  # not read as the default command
    main(["--results", str(tmp_path / "res"), "--out", str(out)])
    (row,) = json.loads((out / "curriculum_runs.json").read_text())["runs"]
    assert (row["flags"], row["run folder"]) == ("(no command in README.md)", "not recorded")
    # after and before of other users: an error naming the folder, not a silently wrong difference
    (run / "validation.json").write_text(json.dumps({**val, "after": after[:-1]}))
    with pytest.raises(ValueError, match="curriculum_cpu_up: the validations before and after are not of the same"):
        main(["--results", str(tmp_path / "res"), "--out", str(out)])
    for bad in ([str(tmp_path / "missing")], [str(tmp_path / "out")]):  # no folder; no validated run in it
        with pytest.raises(SystemExit):
            main(["--results", *bad, "--out", str(out)])
    assert "no curriculum_cpu*/ folder holds validation.json" in capsys.readouterr().err


def test_rl_headroom_smoke_and_counts(tmp_path, tiny_lm_path, tiny_encoder_path):
    from types import SimpleNamespace as N

    from benchmarks import rl_headroom

    rl_headroom.main(["--smoke", "--model", str(tiny_lm_path), str(tiny_lm_path), "--encoder", str(tiny_encoder_path),
                      "--users", "3", "--group-size", "2", "--temperatures", "1.0", "--batch", "4",
                      "--out", str(tmp_path)])  # fmt: skip
    data = json.loads((tmp_path / "rl_headroom_smoke.json").read_text())
    greedy, sampled, greedy2, sampled2 = data["rows"]  # per model: greedy, then each temperature
    versus = ("greedy - first model's (95% CI)", "better / worse")
    assert [greedy[k] for k in versus] == ["-", "-"]  # the first model's greedy row is the reference
    assert [greedy2.pop(k) for k in versus] == ["+0.0000 [+0.0000, +0.0000]", "0 / 0"]
    assert greedy2 == {k: v for k, v in greedy.items() if k not in versus}  # the same model twice: the same users,
    assert sampled2 == sampled  # the same seeded draws
    assert (greedy["temperature"], greedy["samples"], sampled["samples"]) == ("0 (greedy)", 3, 6)
    assert greedy["call found"] == greedy["call lost"] == 0 and greedy["best-of-G - greedy"] == 0.0
    assert len(set(data["users"])) == 3

    def ep(ret, ndcg, fail=False):
        return N(reward=ndcg, retrieved_rank=ret, format_errors=["x"] if fail else [],
                 episode_reward_components={"hit": float(ndcg > 0)}, metrics={"ndcg@10": ndcg})  # fmt: skip

    # user 0: greedy retrieved and hit, one sample lost the call; user 1: greedy missed, a sample found and hit
    row = rl_headroom.summarize([ep(2, 0.5), ep(-1, 0.0)], [ep(2, 0.5), ep(-1, 0.0, True), ep(-1, 0.0), ep(4, 1.0)], 2)
    assert (row["reward differs"], row["retrieval differs"], row["hit differs"]) == (2, 2, 2)
    assert (row["call found"], row["call lost"], row["target retrieved"]) == (1, 1, 0.5)
    assert row["best-of-G - greedy"] == 0.5 and row["format failures"] == 0.25 and row["ndcg@10"] == 0.375
    assert row["reward"] == 0.375  # these episodes' rewards are their NDCG@10
    with pytest.raises(ValueError, match="3 sampled records"):
        rl_headroom.summarize([ep(2, 0.5)], [ep(2, 0.5)] * 3, 2)
    for bad in (["--temperatures", "0"], ["--temperatures", "a,b"], ["--users", "0"], ["--train-users", "-1"]):
        with pytest.raises(SystemExit):
            rl_headroom.main(["--smoke", *bad])
    assert rl_headroom.versus({0: 0.5, 1: 0.0, 2: 0.2}, {0: 0.0, 1: 0.25, 2: 0.2}, 0)["better / worse"] == "1 / 1"


def test_rl_headroom_train_users_draws_from_the_fixed_set(tmp_path, tiny_lm_path, tiny_encoder_path):
    from benchmarks import rl_headroom

    base = ["--smoke", "--model", str(tiny_lm_path), "--encoder", str(tiny_encoder_path), "--group-size", "1",
            "--temperatures", "1.0", "--batch", "4", "--out", str(tmp_path)]  # fmt: skip

    def users(*argv):
        rl_headroom.main([*base, *argv])
        return set(json.loads((tmp_path / "rl_headroom_smoke.json").read_text())["users"])

    fixed = users("--users", "3", "--train-users", "3")
    assert len(fixed) == 3 and users("--users", "3", "--train-users", "3", "--seed", "1") == fixed
    assert users("--users", "2", "--train-users", "3", "--seed", "2") <= fixed
    assert users("--users", "3", "--seed", "1") != users("--users", "3", "--seed", "2")  # all of them: other draws
    with pytest.raises(SystemExit, match="2 training users to draw from"):
        rl_headroom.main([*base, "--users", "3", "--train-users", "2"])


@pytest.mark.parametrize(
    ("module", "flag"),
    [
        ("llm_speed", "--episodes"),
        ("env_speed", "--repeats"),
        ("fuzz", "--actions"),  # 0 actions wrote a table of 0 crashes
        ("openenv_load", "--sessions"),
        ("retrieval_speed", "--batches"),
        ("train_step_gpu", "--micro-batch"),
        ("main", "--sb3-timesteps"),
    ],
)
def test_benchmark_counts_must_be_positive(module, flag, capsys):
    import importlib

    main = importlib.import_module(f"benchmarks.{module}").main
    for bad, said in (("0", "0; must be >= 1"), ("-3", "-3; must be >= 1"), ("2.5", "'2.5' is not an integer")):
        with pytest.raises(SystemExit) as e:  # while parsing: before any work
            main([flag, bad])
        assert e.value.code == 2 and f"argument {flag}: {said}" in capsys.readouterr().err
