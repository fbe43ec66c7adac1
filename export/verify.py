"""Proof that a GGUF computes what the trained model computes.

For every GGUF export writes: the vocabulary equals the HF tokenizer's; HF and llama.cpp turn a
fixed set of strings (the three EXAR prompts among them) into the same ids, BOS once; the
GGUF's logits match transformers' on those tokens within ``LOGIT_TOLERANCE[outtype]``; and each
quantized file is compared with the unquantized GGUF (mean KL divergence, top-1 agreement).

Tolerances (max |logit difference| / max(1, max |reference logit|)), measured on stories260K,
the tiny test Llama and SmolLM2-135M with llama.cpp's KV cache in f32, then given a margin:
f32 measured <= 1.5e-6 -> 1e-4; f16 measured <= 2.5e-3 -> 2e-2; bf16 measured <= 1.5e-2 -> 6e-2.

The strings never start with whitespace: runs of leading spaces tokenize differently in
sentencepiece, HF and llama.cpp alike, and exar's prompts strip them (``exar.prompts``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from exar.errors import ExarError
from exar.prompts import PLAIN, PromptStyle, render_answer, render_exar, render_validator

LOGIT_TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "bf16": 6e-2}
FIXED_TEXTS = (
    "Once upon a time",
    "What is the capital of France?",
    "In 1492, 3.14 and 2,100 are numbers; C# and ## survive.",
    "naïve café, Zürich — 東京",
    "a first line\nand a second one",
)
_GGML_TYPE_F32 = 0


def check_texts(style: PromptStyle = PLAIN) -> list[str]:
    """The strings every GGUF is checked on: fixed ones and the three EXAR prompts, rendered by exar.prompts."""
    return [
        *FIXED_TEXTS,
        render_answer("What is the capital of France?", "France is a country in Europe.", style),
        render_validator("What is the capital of France?", "Paris", style),
        render_exar("What is the capital of France?", ["Lyon", "Marseille"], style),
    ]


class LlamaCppModel:
    """A llama.cpp model (optionally with a LoRA GGUF) that gives the logits of every position."""

    def __init__(self, gguf_path: Path | str, lora_path: Path | str | None = None, n_ctx: int = 512, threads: int | None = None):
        import os

        import llama_cpp

        self.path = Path(gguf_path)
        try:
            self.llm = llama_cpp.Llama(str(gguf_path), lora_path=str(lora_path) if lora_path else None, logits_all=True,
                                       n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads or os.cpu_count(), verbose=False,
                                       type_k=_GGML_TYPE_F32, type_v=_GGML_TYPE_F32)
        except (ValueError, RuntimeError) as e:
            raise ExarError(f"{gguf_path}: llama.cpp cannot load it ({e})") from None

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def logits(self, ids: Sequence[int]):
        import numpy as np

        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def n_vocab(self) -> int:
        return self.llm.n_vocab()

    def close(self) -> None:
        self.llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def hf_reference(hf_dir: Path | str, adapter_dir: Path | str | None = None):
    """(tokenizer, fp32 model) from transformers, with a PEFT adapter on top if given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return tokenizer, model.eval()


def hf_logits(model, ids: Sequence[int]):
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def verify_gguf(gguf_path: Path | str, hf_dir: Path | str, *, outtype: str, style: PromptStyle = PLAIN,
                lora_path: Path | str | None = None, adapter_dir: Path | str | None = None) -> dict:
    """Vocabulary, token ids and logits of ``gguf_path`` (+ ``lora_path``) against transformers on ``hf_dir`` (+ ``adapter_dir``)."""
    import numpy as np

    from exar.export.quantize import read_gguf_header

    tokenizer, model = hf_reference(hf_dir, adapter_dir)
    gguf_tokens = _gguf_tokens(read_gguf_header(gguf_path))
    hf_vocab = tokenizer.get_vocab()
    vocab_mismatch = [f"{i}: gguf {gguf_tokens[i]!r} hf {text!r}" for text, i in hf_vocab.items()
                      if i >= len(gguf_tokens) or gguf_tokens[i] != text]
    texts = check_texts(style)
    token_mismatch = []
    worst = 0.0
    with LlamaCppModel(gguf_path, lora_path) as llm:
        n_vocab_ok = llm.n_vocab() == len(gguf_tokens)
        for text in texts:
            hf_ids = tokenizer(text).input_ids
            cpp_ids = llm.tokenize(text)
            if hf_ids != cpp_ids:
                token_mismatch.append({"text": text[:60], "hf": hf_ids[:12], "llama_cpp": cpp_ids[:12]})
            reference = hf_logits(model, hf_ids)
            got = llm.logits(hf_ids)
            worst = max(worst, float(np.abs(got - reference).max() / max(1.0, float(np.abs(reference).max()))))
    tolerance = LOGIT_TOLERANCE[outtype]
    result = {
        "vocab_equal": not vocab_mismatch and n_vocab_ok,
        "vocab_mismatches": vocab_mismatch[:5],
        "token_ids_equal": not token_mismatch,
        "token_mismatches": token_mismatch[:3],
        "texts": len(texts),
        "logit_rel_max_diff": worst,
        "logit_tolerance": tolerance,
    }
    result["passed"] = result["vocab_equal"] and result["token_ids_equal"] and worst <= tolerance
    return result


def compare_quantized(quant_path: Path | str, reference_path: Path | str, *, style: PromptStyle = PLAIN,
                      lora_path: Path | str | None = None) -> dict:
    """Mean KL(reference || quantized) per token and top-1 agreement, both in llama.cpp, on ``check_texts``."""
    import numpy as np

    kls, agree, count = [], 0, 0
    with LlamaCppModel(reference_path, lora_path) as ref, LlamaCppModel(quant_path, lora_path) as quant:
        for text in check_texts(style):
            ids = ref.tokenize(text)
            p_logits, q_logits = ref.logits(ids), quant.logits(ids)
            log_p, log_q = _log_softmax(p_logits), _log_softmax(q_logits)
            kls.extend((np.exp(log_p) * (log_p - log_q)).sum(axis=-1).tolist())
            agree += int((p_logits.argmax(-1) == q_logits.argmax(-1)).sum())
            count += len(ids)
    return {"mean_kl": float(np.mean(kls)), "top1_agreement": agree / count, "tokens": count}


def _log_softmax(logits):
    import numpy as np

    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _gguf_tokens(reader) -> list[str]:
    field = reader.get_field("tokenizer.ggml.tokens")
    if field is None:
        raise ExarError(f"{reader.data.filename if hasattr(reader.data, 'filename') else 'GGUF'}: no tokenizer.ggml.tokens")
    return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]


def format_quant_table(rows: list[dict]) -> str:
    """The quantized-vs-unquantized table printed after an export."""
    lines = [f"{'file':<34} {'mean KL':>10} {'top-1':>7}"]
    for row in rows:
        lines.append(f"{row['file']:<34} {row['mean_kl']:>10.5f} {row['top1_agreement']:>7.1%}")
    return "\n".join(lines)
