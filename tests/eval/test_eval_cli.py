"""exar-eval on the command line: one-line errors with exit != 0, and the score command on the paper's file."""

import json

import pytest

from conftest import THREADS
from exar.eval.cli import main

PAPER_FILE = "data/exar-seed/dolly_preds_T0.1_labelled.jsonl"


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_explains_variants(capsys):
    code, out, _ = run_cli(["compare", "--help"], capsys)
    assert code == 0
    for word in ("hf-merged", "gguf:<quant>", "adapters:<quant>", "FIRST is the reference", "--bertscore-model"):
        assert word in out


def test_a_variant_the_run_lacks(eval_run, capsys):
    code, _, err = run_cli(["compare", "--run", str(eval_run.root), "--variants", "hf,gguf:q8_0"], capsys)
    assert_one_line_error(code, err, "variant gguf:q8_0", "no q8_0 GGUF", "exported: q4_0, f32")
    code, _, err = run_cli(["compare", "--run", str(eval_run.root), "--variants", "hf,int3"], capsys)
    assert_one_line_error(code, err, "unknown variant 'int3'")
    assert not eval_run.path("eval").exists()  # nothing was started


def test_a_test_file_without_references(eval_run, tmp_path, capsys):
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question": "What is the capital of France?"}) + "\n")
    code, _, err = run_cli(["compare", "--run", str(eval_run.root), "--variants", "gguf:q4_0",
                            "--test", str(questions)], capsys)
    assert_one_line_error(code, err, f"{questions}:1", "'answer'")


def test_compare_from_the_command_line(eval_run, capsys):
    code, out, _ = run_cli(["compare", "--run", str(eval_run.root), "--variants", "gguf:f32,gguf:q4_0",
                            "--what", "answer", "--limit", "2", "--max-new-tokens", "8", "--threads", str(THREADS),
                            "-o", "eval/cli", "--json"], capsys)
    assert code == 0
    summary = json.loads(out)
    assert summary["report"] == str(eval_run.path("eval/cli/report.json"))
    assert [v["name"] for v in summary["variants"]] == ["gguf:f32", "gguf:q4_0"]
    assert summary["sentences"][0].startswith("gguf:q4_0: BERTScore F1 ")
    assert eval_run.path("eval/cli/report.png").is_file()


def test_score_mismatched_lengths_and_missing_fields(tmp_path, capsys):
    predictions, references = tmp_path / "preds.jsonl", tmp_path / "refs.jsonl"
    predictions.write_text("".join(json.dumps({"prediction": p}) + "\n" for p in ("Paris", "Mars")))
    references.write_text(json.dumps({"answer": "Paris"}) + "\n")
    code, _, err = run_cli(["score", str(predictions), "--references", str(references)], capsys)
    assert_one_line_error(code, err, "has 2 records", "has 1", "pair up")
    code, _, err = run_cli(["score", str(predictions), "--references", str(predictions)], capsys)
    assert_one_line_error(code, err, f"{predictions}: record 1 has no field 'answer'", "--reference-field")


def test_score_by_hand(tmp_path, capsys):
    predictions = tmp_path / "preds.jsonl"
    rows = [{"prediction": "The Paris", "answer": "paris"},            # SQuAD EM only (article dropped)
            {"prediction": "mars", "answer": "Mars"},                  # both exact matches
            {"prediction": "blue whale", "answer": "the big blue whale", "aliases": ["whale"]}]
    predictions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out_file = tmp_path / "scored.jsonl"
    code, out, _ = run_cli(["score", str(predictions), "-o", str(out_file), "--json"], capsys)
    assert code == 0
    summary = json.loads(out)
    assert summary["counts"]["em_lower"] == 1 and summary["counts"]["em_squad"] == 2
    scored = [json.loads(line) for line in out_file.read_text().splitlines()]
    # token F1 of "blue whale" vs "the big blue whale": precision 2/2, recall 2/3 (article dropped)
    assert scored[2]["exar_token_f1"] == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert [row["exar_label"] for row in scored][:2] == ["CORRECT", "CORRECT"]


@pytest.mark.shared
def test_score_the_papers_dolly_file(shared_dir, capsys):
    """#match 34/100 as the paper's file says; ROUGE-L near its RG_L_F1 column (it tokenizes differently)."""
    path = shared_dir / PAPER_FILE
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    code, out, _ = run_cli(["score", str(path), "--prediction-field", "Generated_Response",
                            "--reference-field", "response", "--json"], capsys)
    assert code == 0
    summary = json.loads(out)
    assert summary["rows"] == 100 and summary["counts"]["em_lower"] == 34
    assert summary["bertscore"]["num_layers"] == 6
    theirs = [json.loads(line)["RG_L_F1"] for line in path.read_text().splitlines()]
    assert summary["mean"]["rougeL_f"] == pytest.approx(sum(theirs) / 100, abs=0.02)  # 0.550 vs 0.534
