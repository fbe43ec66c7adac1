"""Role rows, the completion-only mask on real tokenized prompts, balancing and the threshold."""

from __future__ import annotations

import pytest

from exar.basemodel import prompt_style
from exar.data import QA
from exar.prompts import CORRECT, WRONG, render_exar, render_validator
from exar.train.examples import (IGNORE_INDEX, answer_examples, balance, encode, exar_examples,
                                 label_counts, reference_examples, validator_examples)
from exar.train.trainer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(tiny_llama)


@pytest.mark.parametrize("layout", ["plain", "chat"])
def test_completion_mask_on_real_tokenized_prompts(tiny_llama, tokenizer, layout):
    style = prompt_style(tiny_llama, layout)
    example = answer_examples([QA("What is the capital of France?", "Paris is the capital", context="Europe")],
                              style)[0]
    row = encode(tokenizer, example, max_seq_len=512)
    ids, labels = row["input_ids"], row["labels"]
    prompt_ids = tokenizer(example.prompt).input_ids
    start = len(prompt_ids)
    assert ids[0] == tokenizer.bos_token_id
    # every prompt position is ignored by the loss ...
    assert labels[:start] == [IGNORE_INDEX] * start
    assert ids[:start] == prompt_ids
    # ... every response position counts, EOS included as the last one
    assert labels[start:] == ids[start:]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[start:-1]).strip() == "Paris is the capital"


def test_truncation_keeps_the_prompt_and_drops_rows_without_target(tokenizer, tiny_llama):
    style = prompt_style(tiny_llama)
    example = answer_examples([QA("Who wrote the book?", "one two three four five six")], style)[0]
    full = encode(tokenizer, example, 512)
    prompt_len = full["labels"].count(IGNORE_INDEX)
    cut = encode(tokenizer, example, prompt_len + 2)
    assert cut["input_ids"] == full["input_ids"][:prompt_len + 2]
    assert sum(label != IGNORE_INDEX for label in cut["labels"]) == 2
    assert encode(tokenizer, example, prompt_len) is None


DATASET_PLUS = [
    {"question": "Capital of France?", "reference": "Paris", "prediction": "Lyon", "label": WRONG, "temperature": 0.1},
    {"question": "Capital of France?", "reference": "Paris", "prediction": "Marseille", "label": WRONG,
     "temperature": 0.6},
    {"question": "Capital of France?", "reference": "Paris", "prediction": "lyon.", "label": WRONG, "temperature": 0.8},
    {"question": "Largest planet?", "reference": "Jupiter", "prediction": "Jupiter", "label": CORRECT,
     "temperature": 0.1},
    {"question": "Largest planet?", "reference": "Jupiter", "prediction": "Mars", "label": WRONG, "temperature": 0.8},
]


def test_exar_rows_for_wrong_predictions_target_the_reference(tiny_llama):
    """The paper's dolly script trained the wrong prediction as target; exar trains the reference."""
    style = prompt_style(tiny_llama)
    rows = exar_examples(DATASET_PLUS, style)
    by_prompt = {r.prompt: r for r in rows}
    assert len(rows) == 4
    # the loop's round 2 shows the first rejected answer, round 3 the first two: one row for each
    france = by_prompt[render_exar("Capital of France?", ["Lyon", "Marseille"], style)]
    assert by_prompt[render_exar("Capital of France?", ["Lyon"], style)].completion == "Paris" + style.eos_token
    assert france.completion == "Paris" + style.eos_token          # the reference, never "Lyon"
    assert "Lyon\nMarseille" in france.prompt                      # coolest temperature first
    assert "lyon." not in france.prompt                             # the same answer to the loop (answer_key)
    first_try = by_prompt[render_exar("Largest planet?", [], style)]  # a CORRECT row: empty context
    assert first_try.completion == "Jupiter" + style.eos_token
    retry = by_prompt[render_exar("Largest planet?", ["Mars"], style)]
    assert retry.completion == "Jupiter" + style.eos_token
    assert all("Jupiter" not in r.prompt.split("### Instruction")[0] for r in rows)


def test_validator_rows_balance_and_references(tiny_llama):
    style = prompt_style(tiny_llama)
    rows = validator_examples(DATASET_PLUS, style)
    assert label_counts(rows) == {CORRECT: 1, WRONG: 4}
    assert rows[0].prompt == render_validator("Capital of France?", "Lyon", style)
    assert rows[0].completion == WRONG + style.eos_token
    balanced = balance(rows, seed=0)
    assert label_counts(balanced) == {CORRECT: 4, WRONG: 4}
    assert balance(rows, seed=0) == balanced                       # seeded
    references = reference_examples(DATASET_PLUS, style)
    assert [(r.prompt, r.label) for r in references] == [
        (render_validator("Capital of France?", "Paris", style), CORRECT),
        (render_validator("Largest planet?", "Jupiter", style), CORRECT),
    ]
    with pytest.raises(Exception, match="both labels"):
        balance([r for r in rows if r.label == WRONG], seed=0)

