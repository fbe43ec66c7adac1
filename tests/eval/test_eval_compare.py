"""exar-eval compare on the exported stories260K run: hf vs gguf:f32 agree exactly; q4_0 costs something."""

import json
import re

import pytest

from conftest import TEST_QA, THREADS
from exar.eval.compare import ANSWER_METRICS, PIPELINE_METRICS, CompareSettings, compare

VARIANTS = "hf,gguf:f32,gguf:q4_0,adapters:q4_0"
QUALITY = [key for key, _, _ in ANSWER_METRICS + PIPELINE_METRICS if not key.endswith("_ms")]


@pytest.fixture
def settings():
    return CompareSettings(what="both", threads=THREADS, resamples=200)


def test_full_precision_gguf_matches_transformers_and_q4_0_costs(eval_run, settings):
    report = compare(eval_run, VARIANTS, settings=settings, loop_overrides={"max_new_tokens": 24}, progress=False)
    hf, f32, q4, adapters = report["variants"]
    assert [v["name"] for v in report["variants"]] == VARIANTS.split(",")
    assert report["test"]["questions"] == len(TEST_QA) and hf["reference"] and hf["differences"] == {}

    # gguf:f32 vs hf: the same greedy answers and loop decisions, so every quality difference is exactly 0
    assert f32["mean"]["agree"] == 1.0 and f32["mean"]["loop_agree"] == 1.0
    for key in QUALITY:
        diff = f32["differences"][key]
        assert (diff["diff"], diff["low"], diff["high"]) == (0.0, 0.0, 0.0), key
    rows = report["rows"]
    assert [r["variants"]["gguf:f32"]["answer"] for r in rows] == [r["variants"]["hf"]["answer"] for r in rows]
    # ... and the same distributions, to float noise (f32 KV cache, no flash attention)
    assert abs(f32["differences"]["nll"]["diff"]) < 1e-4
    assert f32["mean"]["kl"] < 1e-7
    assert f32["perplexity"] == pytest.approx(hf["perplexity"], rel=1e-5)
    assert f32["sentence"] == ("gguf:f32: BERTScore F1 +0.000 [+0.000, +0.000]; no significant difference; "
                               "100% of answers identical to hf")

    # the 4-bit variants: real numbers, a visible KL, other answers, smaller files
    for variant in (q4, adapters):
        assert 0.05 < variant["mean"]["kl"] < 5.0
        assert variant["mean"]["agree"] < 1.0
        assert 0.0 <= variant["mean"]["bertscore_f"] <= 1.0 and variant["perplexity"] > 1.0
        assert re.fullmatch(rf"{re.escape(variant['name'])}: BERTScore F1 [+-]\d\.\d{{3}} \[[+-]\d\.\d{{3}}, "
                            rf"[+-]\d\.\d{{3}}\]; (no significant difference|significant (gain|loss)); "
                            rf"\d+% of answers identical to hf", variant["sentence"])
    manifest_bytes = {a["path"]: a["bytes"] for a in eval_run.artifacts}
    assert q4["bytes"] == sum(manifest_bytes[f"gguf/{r}.q4_0.gguf"] for r in ("answer", "validator", "exar"))
    assert q4["bytes"] < f32["bytes"] / 3
    assert adapters["bytes"] < q4["bytes"]  # one base + three small LoRA files

    # pipeline and validator numbers are consistent with the per-question rows
    for variant in report["variants"]:
        pipeline = variant["pipeline"]
        assert sum(pipeline["decisions"].values()) == len(TEST_QA)
        assert 1.0 <= pipeline["mean_rounds"] <= 3.0
        assert variant["validator"]["support"]["n"] == len(TEST_QA)

    # metacognition for every variant: gguf:f32 ranks the same answers with the same p(CORRECT) as hf
    for variant in report["variants"]:
        m = variant["metacognition"]
        assert m["n"] == len(TEST_QA) and set(m["transitions"]) >= {"right_wrong", "wrong_right", "net"}
        assert sum(r["reached"] for r in m["per_round"][:1]) == len(TEST_QA)
        assert len(m["risk_coverage"]["validator"]["risk"]) == len(TEST_QA)
        assert m["figures"]["acceptance_rate"]["value"] == variant["pipeline"]["accepted_first"]
    for key in ("acceptance_rate", "stage_zero_accuracy", "loop_accuracy", "aurc", "accuracy_at_0.7"):
        assert f32["metacognition"]["figures"][key]["value"] == pytest.approx(hf["metacognition"]["figures"][key]["value"])
    assert all(line.startswith(("hf: ", "gguf:f32: ", "gguf:q4_0: ", "adapters:q4_0: "))
               for line in report["metacognition_sentences"])

    # the three files, recorded in the manifest; the PNG opens
    from PIL import Image

    folder = eval_run.path("eval/compare")
    saved = json.loads((folder / "report.json").read_text())
    assert saved["sentences"] == report["sentences"] and len(saved["sentences"]) == 3
    markdown = (folder / "report.md").read_text()
    assert all(sentence in markdown for sentence in report["sentences"])
    assert "| BERTScore F1 | " in markdown
    assert "## Does the validator know?" in markdown and "## The loop: what it changed" in markdown
    assert all(line in markdown for line in report["metacognition_sentences"])
    with Image.open(folder / "report.png") as image:
        image.verify()
    with Image.open(folder / "report.png") as image:
        assert image.format == "PNG" and image.size[0] >= 800
    kinds = {a["path"]: a["kind"] for a in eval_run.artifacts}
    for name in ("report.json", "report.md", "report.png", "generations", "teacher"):
        assert kinds[f"eval/compare/{name}"] == "eval-report"
    assert sorted(p.name for p in (folder / "generations").iterdir()) == [
        "adapters-q4_0.jsonl", "gguf-f32.jsonl", "gguf-q4_0.jsonl", "hf.jsonl"]

    # a rerun with one more variant computes only that one, and the old numbers stay as they were
    again = compare(eval_run, VARIANTS + ",hf-merged", settings=settings, loop_overrides={"max_new_tokens": 24},
                    progress=False)
    assert [v["computed"] for v in again["variants"]] == [0, 0, 0, 0, len(TEST_QA)]
    assert [v["mean"] for v in again["variants"][:4]] == [v["mean"] for v in report["variants"]]
    assert again["variants"][4]["mean"]["agree"] == 1.0  # merged in f32 (the export's outtype here)

    # answers only: the full-loop generations serve it from the cache
    answers = compare(eval_run, "hf,gguf:q4_0", settings=CompareSettings(what="answer", threads=THREADS),
                      loop_overrides={"max_new_tokens": 24}, progress=False)
    assert [v["computed"] for v in answers["variants"]] == [0, 0]
    assert answers["variants"][1]["mean"]["bertscore_f"] == report["variants"][2]["mean"]["bertscore_f"]
    assert "loop_bertscore_f" not in answers["variants"][0]["mean"]


def test_changed_settings_are_recomputed_not_reused(eval_run):
    settings = CompareSettings(what="answer", threads=THREADS, limit=2)
    first = compare(eval_run, "gguf:q4_0", settings=settings, loop_overrides={"max_new_tokens": 4}, progress=False)
    assert first["variants"][0]["computed"] == 2
    same = compare(eval_run, "gguf:q4_0", settings=settings, loop_overrides={"max_new_tokens": 4}, progress=False)
    assert same["variants"][0]["computed"] == 0
    longer = compare(eval_run, "gguf:q4_0", settings=settings, loop_overrides={"max_new_tokens": 6}, progress=False)
    assert longer["variants"][0]["computed"] == 2
    assert all(len(r["rounds"]) == 1 for r in map(json.loads, eval_run.path(
        "eval/compare/generations/gguf-q4_0.jsonl").read_text().splitlines()))
