"""exar-train pretrain on the tiny Llama: token chunks, held-out perplexity, and merging into the base."""

from __future__ import annotations

import json
import math

import pytest

from exar.errors import ExarError
from exar.retrieval import load_documents
from exar.train.cli import main
from exar.train.pretrain import perplexity, token_chunks

WORDS = ("the institute staff leave travel rail mileage passwords helpdesk beacon desk annual days tide "
         "vessel catamaran skipper radio check in every ninety minutes safety course field station").split()
SMALL = ["--bits", "16", "--batch-size", "4", "--grad-accum", "1", "--lr", "0.01", "--max-seq-len", "80",
         "--no-gradient-checkpointing", "--lora-r", "4", "--lora-alpha", "8"]


def exar_train(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


@pytest.fixture
def text(tmp_path):
    """A document of a few thousand tokens in the tiny tokenizer's words, deterministic."""
    lines = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) + "." for i in range(60)]
    path = tmp_path / "policy.md"
    path.write_text("# Policy\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_held_out_blocks_never_reach_training(tiny_llama, text):
    from exar.train.trainer import load_tokenizer

    tokenizer = load_tokenizer(tiny_llama)
    (doc,) = load_documents([text])
    n_tokens = len(tokenizer(doc.text, add_special_tokens=False).input_ids)
    train, held = token_chunks(tokenizer, [doc], chunk_tokens=64, overlap=16, held_out=0.2, seed=0)
    n_blocks = n_tokens // 64 + (n_tokens % 64 >= 16)
    assert len(held) == round(0.2 * n_blocks) and all(c.tokens == 64 for c in held)
    assert all(c.tokens <= 64 for c in train)
    held_starts = {int(c.id.split("@")[1]) for c in held}
    for chunk in train:  # a training window covers token positions [start, start + tokens)
        start = int(chunk.id.split("@")[1])
        assert not any(start < h + 64 and h < start + chunk.tokens for h in held_starts), chunk.id
    covered = {t for c in train for t in range(int(c.id.split("@")[1]), int(c.id.split("@")[1]) + c.tokens)}
    covered |= {t for h in held_starts for t in range(h, min(h + 64, n_tokens))}
    assert covered == set(range(n_tokens))  # every token is trained on or held out
    again = token_chunks(tokenizer, [doc], chunk_tokens=64, overlap=16, held_out=0.2, seed=0)
    assert again == (train, held)
    with pytest.raises(ExarError, match="--overlap"):
        token_chunks(tokenizer, [doc], chunk_tokens=64, overlap=64)


def test_pretrain_reports_perplexity_before_and_after(tiny_llama, text, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = exar_train(capsys, "pretrain", "--base", tiny_llama, "--text", text, "--run", run,
                                "--chunk-tokens", "64", "--overlap", "16", "--held-out", "0.2", "--max-steps", "4",
                                *SMALL)
    assert code == 0, err
    section = json.loads((run / "run.json").read_text())["pretrain"]
    assert section["steps"] == 4 and section["chunks"]["held_out"] >= 1
    assert f"({section['held_out_tokens']} tokens): {section['ppl_before']:.2f} -> {section['ppl_after']:.2f}" in out
    assert section["ppl_after"] < section["ppl_before"]

    # the recorded figures are the perplexity of the base, and of base + the saved adapter
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from exar.train.examples import encode
    from exar.train.pretrain import chunk_examples
    from exar.train.trainer import load_tokenizer

    tokenizer = load_tokenizer(tiny_llama)
    _, held = token_chunks(tokenizer, load_documents([text]), chunk_tokens=64, overlap=16, held_out=0.2, seed=0)
    rows = [encode(tokenizer, e, 80) for e in chunk_examples(held)]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    before, tokens = perplexity(base, rows)
    after, _ = perplexity(PeftModel.from_pretrained(base, str(run / "adapters" / "pretrain")), rows)
    assert tokens == section["held_out_tokens"] == sum(len(r["input_ids"]) - 1 for r in rows)
    assert math.isclose(before, section["ppl_before"], rel_tol=1e-4)
    assert math.isclose(after, section["ppl_after"], rel_tol=1e-4)

    code, out, err = exar_train(capsys, "pretrain", "--base", tiny_llama, "--text", text, "--run", run,
                                "--chunk-tokens", "64", "--overlap", "16", "--held-out", "0.2", "--max-steps", "4",
                                *SMALL)
    assert code == 0 and "is done" in err

    from exar.train.generate_qa import resolve_generator

    generator = resolve_generator(run)  # generate-qa --model RUN: the run's base with its pre-trained adapter
    assert (generator.model_path, generator.adapter) == (str(tiny_llama.resolve()), str(run / "adapters" / "pretrain"))
    assert generator.layout == "chat"  # the tiny tokenizer has a chat template


@pytest.mark.slow
def test_all_merge_pretrained_trains_the_roles_on_the_merged_base(tiny_llama, text, tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from exar.export.lora import read_adapter

    run = tmp_path / "run"
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"What is rule {i}?", "answer": f"rule {i} is {WORDS[i]}"}) + "\n"
                          for i in range(16)))
    assert exar_train(capsys, "pretrain", "--base", tiny_llama, "--text", text, "--run", run, "--chunk-tokens", "64",
                      "--max-steps", "2", *SMALL)[0] == 0
    code, out, err = exar_train(capsys, "stage-zero", "--base", tiny_llama, "--data", qa, "--run", tmp_path / "other",
                                "--max-steps", "1", *SMALL)
    assert code == 0, err
    code, _, err = exar_train(capsys, "all", "--base", tiny_llama, "--data", qa, "--run", tmp_path / "other",
                              "--merge-pretrained", "--max-steps", "1", *SMALL)
    assert code == 1 and "no pre-trained adapter" in err

    code, out, err = exar_train(capsys, "all", "--base", tiny_llama, "--data", qa, "--run", run, "--merge-pretrained",
                                "--max-steps", "1", "--predict-limit", "4", "--max-new-tokens", "4",
                                "--temperature", "0.8", *SMALL)
    assert code == 0, err
    settings = json.loads((run / "run.json").read_text())
    merged_dir = run / "pretrained-base"
    assert settings["base"]["path"] == str(merged_dir.resolve())
    assert settings["pretrain-merge"]["from_base"]["path"] == str(tiny_llama.resolve())
    for role in ("answer", "validator", "exar"):  # export's own check: each adapter fits the run's (merged) base
        read_adapter(run / "adapters" / role, merged_dir, base_names=(settings["base"]["path"],))

    ids = torch.tensor([[1, 45, 300, 17, 99, 4]])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    peft_logits = PeftModel.from_pretrained(base, str(run / "adapters" / "pretrain")).eval()(ids).logits
    merged_logits = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)(ids).logits
    assert torch.allclose(peft_logits, merged_logits, atol=1e-5)

    code, _, err = exar_train(capsys, "all", "--base", tiny_llama, "--data", qa, "--run", run, "--merge-pretrained",
                              "--max-steps", "1", "--predict-limit", "4", "--max-new-tokens", "4",
                              "--temperature", "0.8", *SMALL)
    assert code == 0 and "is done" in err  # the rerun reuses the merged base and skips every stage


def test_bad_text_is_one_line_and_leaves_no_run(tiny_llama, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n \n")
    code, out, err = exar_train(capsys, "pretrain", "--base", tiny_llama, "--text", tmp_path / "empty.txt",
                                "--run", tmp_path / "run", "--chunk-tokens", "64", *SMALL)
    assert code == 1 and err.strip() == f"error: {tmp_path / 'empty.txt'}: empty document (no text)"
    assert not (tmp_path / "run").exists()
