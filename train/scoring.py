"""The validator's verdict as a probability, in transformers (training's calibration and eval's ``hf``).

p(CORRECT) = exp(l_C) / (exp(l_C) + exp(l_W)), with l_C and l_W the summed log-probabilities of
the two labels' token sequences after the validator prompt, exactly as training taught them
(``exar.prompts.label_tokens``; the llama.cpp runtime scores the same tokens). No sampling.
"""

from __future__ import annotations

from typing import Sequence

from exar.prompts import CORRECT, WRONG, PromptStyle, label_tokens, p_correct_from_logprobs


def p_correct_hf(model, tokenizer, prompts: Sequence[str], style: PromptStyle, batch_size: int = 16) -> list[float]:
    """p(CORRECT) for each rendered validator prompt, in right-padded batches.

    One row per prompt when each label is one token (its context's last logits score both), else
    one row per prompt and label (context + the label's tokens, teacher-forced).
    """
    import torch

    from exar.metrics import log_softmax

    def tokenize(text: str) -> list[int]:
        return tokenizer(text).input_ids

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        labelled = [label_tokens(tokenize, prompt, style) for prompt in prompts[start:start + batch_size]]
        rows, reads = [], []  # reads: (row, first position, label ids) per prompt and label
        for lt in labelled:
            if lt.single_token:
                rows.append(list(lt.context))
                reads.append({label: (len(rows) - 1, len(lt.context) - 1, ids) for label, ids in lt.labels.items()})
            else:
                read = {}
                for label, ids in lt.labels.items():
                    rows.append(list(lt.context) + list(ids))
                    read[label] = (len(rows) - 1, len(lt.context) - 1, ids)
                reads.append(read)
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float().cpu().numpy()
        for read in reads:
            logp = {}
            for label, (row, first, ids) in read.items():
                steps = log_softmax(logits[row, first:first + len(ids)])
                logp[label] = float(sum(steps[i, token] for i, token in enumerate(ids)))
            scores.append(p_correct_from_logprobs(logp[CORRECT], logp[WRONG]))
    return scores
