"""The transformers backend against independent by-hand computations, and llama.cpp against it."""

import numpy as np
import pytest

from conftest import TEST_QA, THREADS
from exar.eval.variants import open_variant, parse_variant
from exar.metrics import log_softmax
from exar.prompts import (CORRECT, WRONG, completion_ids, label_tokens, p_correct_from_logprobs, parse_answer,
                          render_answer, render_completion, render_validator, role_fields)

QUESTION = TEST_QA[0]["question"]


@pytest.fixture
def hf(eval_run):
    backend = open_variant(eval_run, parse_variant("hf"), threads=THREADS)
    yield backend
    backend.close()


def _peft(run, role):
    """A fresh single-adapter model: an independent path to what the backend's switched adapter computes."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(run.settings["base"]["path"], dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(run.path(f"adapters/{role}"))).eval()


def test_greedy_generation_is_the_argmax_path_of_the_answer_adapter(eval_run, hf):
    import torch

    prompt = render_answer(QUESTION, "", hf.style)
    generation = hf.generate("answer", prompt, temperature=0.0, top_p=0.9, seed=0, max_new_tokens=12)
    model, ids = _peft(eval_run, "answer"), hf.tokenize(prompt)
    logprobs = []
    with torch.no_grad():
        for _ in range(12):
            row = model(torch.tensor([ids])).logits[0, -1].double()
            ids.append(int(row.argmax()))
            logprobs.append(float(torch.log_softmax(row, dim=0)[ids[-1]]))
    new = ids[-12:]
    assert hf.tokenizer.eos_token_id not in new
    assert generation.tokens == 12
    assert generation.logprob == pytest.approx(sum(logprobs) / 12, abs=1e-5)  # the free confidence baseline
    assert generation.text == parse_answer(hf.tokenizer.decode(new, skip_special_tokens=True), hf.style)
    # the validator adapter, switched on the same base, continues differently
    other = hf.generate("validator", prompt, temperature=0.0, top_p=0.9, seed=0, max_new_tokens=12)
    assert other.text != generation.text


def test_p_correct_compares_the_labels_whole_token_sequences(eval_run, hf):
    """stories260K spells CORRECT in 7 tokens and WRONG in 5: every one of them is scored."""
    import torch

    prompt = render_validator(QUESTION, "Paris", hf.style)
    p, ms = hf.p_correct(prompt)
    labels = label_tokens(hf.tokenize, prompt, hf.style)
    assert [len(labels.labels[label]) for label in (CORRECT, WRONG)] == [7, 5]
    model, logp = _peft(eval_run, "validator"), {}
    for label, ids in labels.labels.items():  # teacher-force each label after the prompt, one sequence each
        sequence = list(labels.context) + list(ids)
        with torch.no_grad():
            rows = torch.log_softmax(model(torch.tensor([sequence])).logits[0].double(), dim=-1)
        logp[label] = sum(float(rows[len(labels.context) - 1 + i, token]) for i, token in enumerate(ids))
    expected = p_correct_from_logprobs(logp[CORRECT], logp[WRONG])
    assert p == pytest.approx(expected, abs=1e-6) and ms > 0
    next_token = rows[len(labels.context) - 1]  # after the prompt: the same row in both sequences
    first_tokens_margin = float(next_token[labels.labels[CORRECT][0]] - next_token[labels.labels[WRONG][0]])
    assert abs(first_tokens_margin - (logp[CORRECT] - logp[WRONG])) > 0.5  # what exar scored before differs
    runtime = open_variant(eval_run, parse_variant("gguf:f32"), threads=THREADS)  # llama.cpp scores the same tokens
    try:
        assert runtime.p_correct(prompt)[0] == pytest.approx(p, rel=1e-3)  # p is tiny here: compare relatively
    finally:
        runtime.close()
    base = open_variant(eval_run, parse_variant("base"), threads=THREADS)
    assert abs(np.log(base.p_correct(prompt)[0]) - np.log(p)) > 0.1  # the base has no validator adapter
    base.close()


def test_teacher_forcing_agrees_across_backends(eval_run, hf):
    """llama.cpp on the f32 GGUF gives transformers' log-probs (to float noise); q4_0 visibly does not."""
    fields = role_fields("answer", QUESTION, style=hf.style)
    prompt = render_answer(QUESTION, "", hf.style)
    ids, n_prompt = completion_ids(hf.tokenize, prompt, render_completion(fields, TEST_QA[0]["answer"], hf.style))
    reference = log_softmax(hf.teacher_forced_logits("answer", ids[:n_prompt], ids[n_prompt:]))
    assert reference.shape == (len(ids) - n_prompt, 512)
    assert np.exp(reference).sum(axis=-1) == pytest.approx(np.ones(len(reference)), abs=1e-9)
    gaps = {}
    for name in ("gguf:f32", "adapters:q4_0"):
        runtime = open_variant(eval_run, parse_variant(name), threads=THREADS)
        try:
            # generate first, so the forced pass must also cope with a cached sequence in the slot
            runtime.generate("answer", prompt, temperature=0.0, top_p=0.9, seed=0, max_new_tokens=8)
            logprobs = log_softmax(runtime.teacher_forced_logits("answer", ids[:n_prompt], ids[n_prompt:]))
            gaps[name] = float(np.abs(logprobs - reference).max())
        finally:
            runtime.close()
    assert gaps["gguf:f32"] < 1e-4
    assert gaps["adapters:q4_0"] > 1e-2
