"""The validator's verdict as a probability, and the threshold the edge loop accepts at.

p(CORRECT) = exp(l_C) / (exp(l_C) + exp(l_W)), with l_C and l_W the next-token logits of the
two labels' first tokens at the end of the validator prompt: one forward pass, no sampling. eval's
``hf`` backend imports ``p_correct_hf`` from here.
"""

from __future__ import annotations

from typing import Sequence

from exar.prompts import CORRECT, WRONG, PromptStyle, label_token_ids


def p_correct_hf(model, tokenizer, prompts: Sequence[str], style: PromptStyle, batch_size: int = 16) -> list[float]:
    """p(CORRECT) for each rendered validator prompt, batched with left padding."""
    import torch

    def tokenize(text: str) -> list[int]:
        return tokenizer(text).input_ids

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    scores: list[float] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start:start + batch_size])
            encoded = tokenizer(batch, return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                logits = model(**encoded).logits[:, -1, :].float()
            for row, prompt in zip(logits, batch):
                ids = label_token_ids(tokenize, prompt)
                pair = torch.stack([row[ids[CORRECT]], row[ids[WRONG]]])
                scores.append(torch.softmax(pair, dim=0)[0].item())
    finally:
        tokenizer.padding_side = side
    return scores


def classification_numbers(scores: Sequence[float], truth: Sequence[bool], threshold: float) -> dict:
    """Accuracy, precision, recall and balanced accuracy of ``p >= threshold`` as CORRECT."""
    tp = sum(s >= threshold and t for s, t in zip(scores, truth))
    fp = sum(s >= threshold and not t for s, t in zip(scores, truth))
    fn = sum(s < threshold and t for s, t in zip(scores, truth))
    tn = sum(s < threshold and not t for s, t in zip(scores, truth))
    positives, negatives = tp + fn, tn + fp
    recall = tp / positives if positives else 0.0
    specificity = tn / negatives if negatives else 0.0
    return {
        "n": len(scores),
        "accuracy": (tp + tn) / len(scores) if scores else 0.0,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": recall,
        "balanced_accuracy": (recall + specificity) / 2,
    }


def best_threshold(scores: Sequence[float], truth: Sequence[bool], default: float) -> tuple[float, str]:
    """The threshold that maximizes balanced accuracy, and how it was chosen.

    Candidates are the midpoints between neighbouring distinct scores (plus ``default``); ties go
    to the candidate nearest ``default``. With one class missing there is nothing to fit, so
    ``default`` is returned and the reason says so.
    """
    if not scores or all(truth) or not any(truth):
        return default, "default: the validation slice lacks one of the classes"
    distinct = sorted(set(scores))
    candidates = [default] + [(a + b) / 2 for a, b in zip(distinct, distinct[1:])]
    candidates += [distinct[0] - 1e-9 if distinct[0] > 0 else 0.0, min(1.0, distinct[-1] + 1e-9)]
    best = max(candidates, key=lambda c: (classification_numbers(scores, truth, c)["balanced_accuracy"], -abs(c - default)))
    return float(best), "balanced_accuracy on the validation slice"
