"""The transformers backend against independent by-hand computations, and llama.cpp against it."""

import numpy as np
import pytest

from conftest import TEST_QA, THREADS
from exar.eval.teacher import log_softmax, target_ids
from exar.eval.variants import open_variant, parse_variant
from exar.prompts import (CORRECT, WRONG, label_token_ids, parse_answer, render_answer, render_completion,
                          render_validator, role_fields)

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
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    new = ids[-12:]
    assert hf.tokenizer.eos_token_id not in new
    assert generation.tokens == 12
    assert generation.text == parse_answer(hf.tokenizer.decode(new, skip_special_tokens=True), hf.style)
    # the validator adapter, switched on the same base, continues differently
    other = hf.generate("validator", prompt, temperature=0.0, top_p=0.9, seed=0, max_new_tokens=12)
    assert other.text != generation.text


def test_p_correct_is_the_softmax_of_the_two_label_logits(eval_run, hf):
    import torch

    prompt = render_validator(QUESTION, "Paris", hf.style)
    p, ms = hf.p_correct(prompt)
    labels = label_token_ids(hf.tokenize, prompt)
    with torch.no_grad():
        logits = _peft(eval_run, "validator")(torch.tensor([hf.tokenize(prompt)])).logits[0, -1].double()
    expected = torch.softmax(logits[[labels[CORRECT], labels[WRONG]]], dim=0)[0].item()
    assert p == pytest.approx(expected, abs=1e-6) and ms > 0
    base = open_variant(eval_run, parse_variant("base"), threads=THREADS)
    assert abs(base.p_correct(prompt)[0] - p) > 1e-3  # the base has no validator adapter
    base.close()


def test_teacher_forcing_agrees_across_backends(eval_run, hf):
    """llama.cpp on the f32 GGUF gives transformers' log-probs (to float noise); q4_0 visibly does not."""
    fields = role_fields("answer", QUESTION, style=hf.style)
    prompt = render_answer(QUESTION, "", hf.style)
    ids, n_prompt = target_ids(hf.tokenize, prompt, render_completion(fields, TEST_QA[0]["answer"], hf.style))
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
