"""The export gate's checks: proof that each written file computes what the trained model computes.

- GGUF (f32/f16/bf16, and base + LoRA GGUF): its vocabulary equals the HF tokenizer's; HF and
  llama.cpp turn a fixed set of strings (the three EXAR prompts among them) into the same ids,
  BOS once; its logits match transformers' (+ the PEFT adapter) within ``LOGIT_TOLERANCE``.
- quantized GGUF (merged, and base + LoRA): mean KL divergence to the unquantized GGUF and top-1
  agreement, against the per-type limits of ``exar.export.gate``.
- merged HF folder: its logits against the PEFT model's, within the tolerance of its dtype.
- consolidated: every tensor, read back as torch.load reads it, equal bit for bit to the HF one.

Transformers' side is ``exar.export.reference`` (one layer at a time, fp32), computed once per
model and adapter and kept in a ``ReferenceCache``. llama.cpp's side runs one model at a time.

Tolerances (max |logit difference| / max(1, max |reference logit|)), measured on stories260K,
the tiny test Llamas and SmolLM2-135M with llama.cpp's KV cache in f32, then given a margin:
f32 measured <= 1.5e-6 -> 1e-4; f16 measured <= 2.5e-3 -> 2e-2; bf16 measured <= 1.5e-2 -> 6e-2.

The strings never start with whitespace: runs of leading spaces tokenize differently in
sentencepiece, HF and llama.cpp alike, and exar's prompts strip them (``exar.prompts``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from exar.errors import ExarError
from exar.export.gate import check, quant_limits, verdict
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
    """The strings every file is checked on: fixed ones and the three EXAR prompts, rendered by exar.prompts."""
    return [
        *FIXED_TEXTS,
        render_answer("What is the capital of France?", "France is a country in Europe.", style),
        render_validator("What is the capital of France?", "Paris", style),
        render_exar("What is the capital of France?", ["Lyon", "Marseille"], style),
    ]


class LlamaCppModel:
    """A llama.cpp model (optionally with a LoRA GGUF) that gives the logits of every position.

    The LoRA is set on the context here rather than through ``Llama(lora_path=...)``: given a
    LoRA, llama-cpp-python turns mmap off and reads the whole base into anonymous memory (2 GiB
    more RSS per check at 1.1B, 13 GiB at 7B), which llama.cpp's runtime adapters do not need.
    """

    def __init__(self, gguf_path: Path | str, lora_path: Path | str | None = None, n_ctx: int = 512, threads: int | None = None):
        import ctypes
        import os

        from exar.llamacpp import load_llama_cpp, native_reason

        llama_cpp = load_llama_cpp()  # with llama.cpp's AMX crash worked around
        self._llama, self._adapter = llama_cpp, None
        self.path = Path(gguf_path)
        try:
            self.llm = llama_cpp.Llama(str(gguf_path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx,
                                       n_threads=threads or os.cpu_count(), verbose=False,
                                       type_k=_GGML_TYPE_F32, type_v=_GGML_TYPE_F32)
        except (ValueError, RuntimeError) as e:
            raise ExarError(f"{gguf_path}: llama.cpp cannot load it ({e})") from None
        if lora_path is None:
            return
        self._adapter = llama_cpp.llama_adapter_lora_init(self.llm.model, str(lora_path).encode())
        if not self._adapter or llama_cpp.llama_set_adapters_lora(
                self.llm.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapter), 1, (ctypes.c_float * 1)(1.0)):
            self.close()
            raise ExarError(f"{lora_path}: llama.cpp cannot apply this LoRA to {gguf_path} ({native_reason()})")

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
        if self._adapter:
            self._llama.llama_adapter_lora_free(self._adapter)
            self._adapter = None
        self.llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Reference:
    """The HF tokenizer's ids for the check texts and transformers' fp32 logits on them."""

    def __init__(self, hf_dir: Path | str, adapter_dir: Path | str | None = None, style: PromptStyle = PLAIN,
                 nf4_base: bool = False):
        from exar.export.lora import read_adapter
        from exar.export.reference import reference_logits
        from exar.export.writer import hf_tokenizer

        self.tokenizer = hf_tokenizer(Path(hf_dir))
        self.texts = check_texts(style)
        self.ids = [self.tokenizer(text).input_ids for text in self.texts]
        adapter = read_adapter(adapter_dir, hf_dir) if adapter_dir is not None else None
        self.logits = reference_logits(hf_dir, self.ids, adapter, nf4_base=nf4_base)


class ReferenceCache:
    """One ``Reference`` per (model, adapter, prompt style) for a whole export."""

    def __init__(self):
        self._cache: dict[tuple, Reference] = {}

    def get(self, hf_dir: Path | str, adapter_dir: Path | str | None = None, style: PromptStyle = PLAIN,
            nf4_base: bool = False) -> Reference:
        key = (str(hf_dir), str(adapter_dir), repr(style.to_dict()), nf4_base)
        if key not in self._cache:
            self._cache[key] = Reference(hf_dir, adapter_dir, style, nf4_base)
        return self._cache[key]


def _rel_max_diff(got: Sequence, expected: Sequence) -> float:
    import numpy as np

    worst = 0.0
    for a, b in zip(got, expected):
        worst = max(worst, float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max()))))
    return worst


def verify_gguf(gguf_path: Path | str, hf_dir: Path | str, *, outtype: str, style: PromptStyle = PLAIN,
                lora_path: Path | str | None = None, adapter_dir: Path | str | None = None,
                cache: ReferenceCache | None = None) -> dict:
    """Gate of ``gguf_path`` (+ ``lora_path``) against transformers on ``hf_dir`` (+ ``adapter_dir``)."""
    from exar.export.quantize import read_gguf_header

    reference = (cache or ReferenceCache()).get(hf_dir, adapter_dir, style)
    gguf_tokens = _gguf_tokens(read_gguf_header(gguf_path))
    vocab_mismatch = [f"{i}: gguf {gguf_tokens[i] if i < len(gguf_tokens) else None!r} hf {text!r}"
                      for text, i in reference.tokenizer.get_vocab().items()
                      if i >= len(gguf_tokens) or gguf_tokens[i] not in (text, text.replace("\u2581", " "))]
    token_mismatch, got = [], []
    with LlamaCppModel(gguf_path, lora_path) as llm:
        if llm.n_vocab() != len(gguf_tokens):
            vocab_mismatch.append(f"llama.cpp sees {llm.n_vocab()} tokens, the file lists {len(gguf_tokens)}")
        for text, hf_ids in zip(reference.texts, reference.ids):
            cpp_ids = llm.tokenize(text)
            if hf_ids != cpp_ids:
                token_mismatch.append({"text": text[:60], "hf": hf_ids[:12], "llama_cpp": cpp_ids[:12]})
            got.append(llm.logits(hf_ids))
    checks = [
        check("vocabulary entries differing from the HF tokenizer", len(vocab_mismatch), 0),
        check("texts tokenized differently from the HF tokenizer", len(token_mismatch), 0),
        check("logits max rel diff vs transformers", _rel_max_diff(got, reference.logits), LOGIT_TOLERANCE[outtype]),
    ]
    return verdict(checks, texts=len(reference.texts), vocab_mismatches=vocab_mismatch[:5],
                   token_mismatches=token_mismatch[:3])


def compare_quantized(quant_path: Path | str, reference_path: Path | str, *, quant: str, style: PromptStyle = PLAIN,
                      lora_path: Path | str | None = None, max_kld: float | None = None) -> dict:
    """Gate of a quantized GGUF: mean KL(reference || quantized) per token and top-1 agreement, in llama.cpp.

    The unquantized model runs first and is closed before the quantized one loads, so only one
    model is mapped at a time.
    """
    import numpy as np

    texts = check_texts(style)
    with LlamaCppModel(reference_path, lora_path) as ref:
        ids = [ref.tokenize(text) for text in texts]
        expected = [ref.logits(i) for i in ids]
    with LlamaCppModel(quant_path, lora_path) as quantized:
        got = [quantized.logits(i) for i in ids]
    kls, agree = [], 0
    for p_logits, q_logits in zip(expected, got):
        log_p, log_q = _log_softmax(p_logits), _log_softmax(q_logits)
        kls.extend((np.exp(log_p) * (log_p - log_q)).sum(axis=-1).tolist())
        agree += int((p_logits.argmax(-1) == q_logits.argmax(-1)).sum())
    tokens = sum(len(i) for i in ids)
    kld_limit, top1_limit, source = quant_limits(quant, max_kld)
    mean_kl, top1 = float(np.mean(kls)), agree / tokens
    checks = [check("mean KL divergence vs unquantized", mean_kl, kld_limit, source=source)]
    if top1_limit is not None:
        checks.append(check("top-1 agreement vs unquantized", top1, top1_limit, at_most=False, source=source))
    return verdict(checks, mean_kl=mean_kl, top1_agreement=top1, tokens=tokens, quant=quant)


def check_merged(merged_dir: Path | str, base_dir: Path | str, adapter_dir: Path | str, *, dtype: str,
                 style: PromptStyle = PLAIN, cache: ReferenceCache | None = None, merge_base: str = "w16") -> dict:
    """Gate of a merged HF folder: its logits against the PEFT model's (base + adapter, unmerged; with
    ``merge_base`` nf4-roundtrip the base is the NF4 round trip QLoRA trained against)."""
    cache = cache or ReferenceCache()
    peft = cache.get(base_dir, adapter_dir, style, nf4_base=merge_base == "nf4-roundtrip")
    merged = cache.get(merged_dir, None, style)
    checks = [
        check("texts tokenized differently from the base tokenizer", sum(a != b for a, b in zip(merged.ids, peft.ids)), 0),
        check("logits max rel diff vs the PEFT model", _rel_max_diff(merged.logits, peft.logits), LOGIT_TOLERANCE[dtype]),
    ]
    return verdict(checks, texts=len(peft.texts))


def check_consolidated(folder: Path | str, hf_dir: Path | str) -> dict:
    """Gate of a consolidated folder: each tensor read back as torch.load would, against the HF tensor it came from."""
    import torch

    from exar.export.consolidated import expected_tensors, iter_consolidated

    expected = {(shard, spec.name): spec for shard, spec in expected_tensors(hf_dir, folder)}
    differing, seen = [], set()
    for shard, name, tensor in iter_consolidated(folder):
        spec = expected.get((shard, name))
        seen.add((shard, name))
        if spec is None or not torch.equal(tensor, spec.make()):
            differing.append(f"consolidated.{shard:02d}.pth {name}")
    missing = [f"consolidated.{s:02d}.pth {n}" for s, n in expected if (s, n) not in seen]
    checks = [check("tensors differing from the HF weights", len(differing), 0),
              check("tensors missing", len(missing), 0)]
    return verdict(checks, tensors=len(seen), differing=(differing + missing)[:5])


def _log_softmax(logits):
    import numpy as np

    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _gguf_tokens(reader) -> list[str]:
    field = reader.get_field("tokenizer.ggml.tokens")
    if field is None:
        raise ExarError(f"{reader.data.filename if hasattr(reader.data, 'filename') else 'GGUF'}: no tokenizer.ggml.tokens")
    return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
