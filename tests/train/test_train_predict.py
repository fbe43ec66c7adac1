"""predict's generation helpers."""

from __future__ import annotations

from exar.train.predict import longest_prompt
from exar.train.trainer import load_tokenizer

PROMPTS = ["Question: What is the capital of France?\nAnswer:", "Question: Who?\nAnswer:"]


def test_longest_prompt_is_the_width_the_tokenizer_pads_a_batch_to(stories260k):
    """A GPU run pads every batch to this one length, so its static cache compiles once:
    36 and 21 tokens (BOS included) in stories260K's 512-token vocabulary."""
    tokenizer = load_tokenizer(stories260k)
    assert longest_prompt(tokenizer, PROMPTS) == 36
    assert longest_prompt(tokenizer, PROMPTS[1:]) == 21
    assert tokenizer(PROMPTS, padding=True, return_tensors="pt").input_ids.shape[1] == 36
