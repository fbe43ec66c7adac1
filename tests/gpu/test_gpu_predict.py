"""predict on CUDA: transformers' static cache with a compiled decode step, the same tokens as the dynamic cache.

Run on a GPU machine with ``python -m pytest tests/gpu``; without CUDA it is skipped.
"""

from __future__ import annotations

import pytest

from tiny import has_cuda

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not has_cuda(), reason="needs a CUDA GPU")]

PROMPTS = ["Question: What is the capital of France?\nAnswer:", "Question: Who wrote it?\nAnswer:",
           "Question: Which planet is red, and which one is the largest of the solar system?\nAnswer:"]


OTHER_PROMPTS = ["Question: Who painted the Mona Lisa?\nAnswer:", "Question: Why?\nAnswer:",
                 "Question: How many legs does a spider have?\nAnswer:"]


def test_generate_batch_compiles_a_static_cache_once_and_decodes_the_dynamic_caches_tokens(tiny_llama):
    """Greedy decoding in fp32: padding every batch to one shape (8 tokens past the longest prompt,
    three rows) changes no token, and a second batch of other prompts and a short last batch of two
    reuse the compiled decode step."""
    import torch
    from torch._dynamo.utils import counters

    from exar.train.predict import generate_batch, longest_prompt
    from exar.train.trainer import device_plan, load_for_inference, load_tokenizer

    model = load_for_inference(tiny_llama, 16, device_plan(16)).float()
    tokenizer = load_tokenizer(tiny_llama)
    tokenizer.padding_side = "left"
    pad_to = longest_prompt(tokenizer, PROMPTS + OTHER_PROMPTS) + 8
    counters.clear()

    def static(prompts):
        return generate_batch(model, tokenizer, prompts, max_new_tokens=12, min_new_tokens=12, temperature=0,
                              top_p=1.0, seed=0, pad_to=pad_to, rows=3)

    def dynamic(prompts):
        encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            out = model.generate(**encoded, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        return tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:], skip_special_tokens=False)

    first = static(PROMPTS)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # the decode step was compiled
    second = static(OTHER_PROMPTS)
    last = static(OTHER_PROMPTS[:2])
    assert counters["stats"]["unique_graphs"] == graphs  # one shape: no recompilation
    assert first == dynamic(PROMPTS)
    assert second == dynamic(OTHER_PROMPTS)
    assert last == second[:2]
