"""The llama.cpp runtime of the EXAR loop (a ``loop.Backend``), through llama-cpp-python's C API.

Two modes over an exported run:

- ``adapters``: ONE base GGUF in memory and the three LoRA GGUFs loaded once
  (``llama_adapter_lora_init``); each call switches the context's adapter with
  ``llama_set_adapters_lora``. One context holds a KV-cache sequence per role, so a role's
  prompt prefix stays cached while the other roles run (the validator's question, the answer
  role's instruction, the rejected answers already in the exar prompt).
- ``merged``: one GGUF per role, each with its own context.

The C API is used directly (not ``llama_cpp.Llama``) because the high-level class owns one
context with one sequence, sets one adapter at load time, and adds per-token Python work that
the loop does not need. Native llama.cpp logs are kept off the terminal unless ``verbose``
(``exar.llamacpp``); their last lines explain a failed load.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from exar.constants import EDGE_BATCH, EDGE_CONTEXT, ROLES
from exar.errors import ExarError
from exar.llamacpp import native_reason, show_native_log
from exar.export.gate import require_passed
from exar.export.layout import LORA, OUTTYPES, gguf_rel
from exar.metrics import log_softmax
from exar.prompts import CORRECT, WRONG, PromptStyle, label_tokens, p_correct_from_logprobs, parse_answer
from exar.rundir import Run, sha256_file

from exar.edge.loop import Generation

MODES = ("adapters", "merged")
GGUF_KINDS = ("gguf-base", "gguf-merged", "gguf-lora")


# --- which files ------------------------------------------------------------------------------

@dataclass(frozen=True)
class EdgeModels:
    """The GGUF files one runtime loads: a base + LoRA per role, or a merged model per role."""

    mode: str
    quant: str
    base: Path | None = None
    loras: Mapping[str, Path] = field(default_factory=dict)
    merged: Mapping[str, Path] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return ([self.base] if self.base else []) + list(self.loras.values()) + list(self.merged.values())


def exported_variants(run: Run, kind: str) -> list[str]:
    """Variants (q4_0, f16, ...) of ``kind`` GGUFs in the manifest: quants first, in export order."""
    variants = []
    for entry in run.find(kind=kind):
        variant = Path(entry["path"]).name.split(".")[1]
        if variant != LORA and variant not in variants:
            variants.append(variant)
    return [v for v in variants if v not in OUTTYPES] + [v for v in variants if v in OUTTYPES]


def find_models(run: Run, *, mode: str | None = None, quant: str | None = None) -> EdgeModels:
    """The GGUFs of ``run`` for ``mode`` (default: adapters when exported) and ``quant`` (default: first)."""
    if not any(run.find(kind=kind) for kind in GGUF_KINDS):
        raise ExarError(f"no GGUF artifacts in {run.root}; run `exar-export --run {run.root} --quant q4_0` first")
    has_adapters = bool(run.find(kind="gguf-base")) and len(run.find(kind="gguf-lora")) == len(ROLES)
    if mode is None:
        mode = "adapters" if has_adapters else "merged"
    if mode not in MODES:
        raise ExarError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    kind = "gguf-base" if mode == "adapters" else "gguf-merged"
    variants = exported_variants(run, kind)
    if not variants:
        raise ExarError(f"{run.root}: no {mode}-mode GGUFs; run `exar-export --run {run.root} --mode {mode}` "
                        f"or use --mode {'merged' if mode == 'adapters' else 'adapters'}")
    quant = quant or variants[0]
    if quant not in variants:
        raise ExarError(f"{run.root}: no {quant} GGUF for {mode} mode (exported: {', '.join(variants)})")
    stale = run.stale()
    if mode == "adapters":
        return EdgeModels(mode, quant, base=_checked(run, gguf_rel("base", quant), stale),
                          loras={role: _checked(run, gguf_rel(role, LORA), stale) for role in ROLES})
    return EdgeModels(mode, quant, merged={role: _checked(run, gguf_rel(role, quant), stale) for role in ROLES})


def _checked(run: Run, rel: str, stale: dict[str, list[str]]) -> Path:
    """A recorded, current GGUF still on disk with its recorded bytes: the size is checked on every
    call, the sha256 on the first load in a process (cached by inode, mtime and size: later calls are
    instant). ``stale`` is ``run.stale()``: a GGUF made from an adapter retrained since is refused."""
    entry, path = run.entry(rel), run.path(rel)
    if entry is None:
        raise ExarError(f"{run.root}: {rel} was not exported; run `exar-export --run {run.root}` first")
    require_passed(run, rel)
    if rel in stale:
        raise ExarError(f"{path}: stale ({stale[rel][0]}); run `exar-export --run {run.root}` again")
    if not path.is_file():
        raise ExarError(f"{path}: recorded in the manifest but missing; run `exar-export --run {run.root}` again")
    if path.stat().st_size != entry["bytes"]:
        raise ExarError(f"{path}: {path.stat().st_size} bytes, the manifest recorded {entry['bytes']}; "
                        f"the file is damaged, run `exar-export --run {run.root}` again")
    sha = sha256_file(path)
    if sha != entry["sha256"]:
        raise ExarError(f"{path}: sha256 {sha[:12]}, the manifest recorded {entry['sha256'][:12]}; "
                        f"the file is damaged, run `exar-export --run {run.root}` again")
    return path


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


# --- the runtime ------------------------------------------------------------------------------

@dataclass
class _Context:
    ptr: object
    memory: object
    batch: object
    n_ctx: int
    adapter: object = None  # the adapter now set on this context (None: the bare model)


@dataclass
class _Slot:
    """Where a role runs: a context, its KV sequence there, its adapter, and the tokens cached in it."""

    context: _Context
    seq: int
    adapter: object = None
    tokens: list[int] = field(default_factory=list)


class LlamaRuntime:
    """A ``loop.Backend`` over llama.cpp; see the module docstring. Close it (or use ``with``)."""

    def __init__(self, models: EdgeModels, style: PromptStyle, *, threads: int | None = None,
                 n_ctx: int = EDGE_CONTEXT, verbose: bool = False, full_precision: bool = False):
        """``full_precision``: f32 KV cache and no flash attention, so an f32 GGUF is compared with
        transformers on its weights alone (eval); the default f16 cache is what a laptop wants."""
        from exar.llamacpp import load_llama_cpp

        llama_cpp = load_llama_cpp()

        self._llama = llama_cpp
        self.style = style
        self.models = models
        self.threads = threads or physical_cores()
        self.n_ctx = n_ctx
        self.full_precision = full_precision
        if self.threads < 1 or n_ctx < 16:
            raise ExarError(f"threads must be >= 1 and the context >= 16 tokens (got {self.threads}, {n_ctx})")
        show_native_log(verbose)
        self._models: list = []
        self._contexts: list[_Context] = []
        self._adapters: list = []
        self.slots: dict[str, _Slot] = {}
        self.prompt_tokens = {"evaluated": 0, "reused": 0}  # how much the per-role KV caches saved
        self._stop = style.stop_strings()
        try:
            if models.mode == "adapters":
                model = self._load_model(models.base)
                context = self._new_context(model, n_seq=len(ROLES))
                for seq, role in enumerate(ROLES):
                    self.slots[role] = _Slot(context, seq, self._load_adapter(model, models.loras[role]))
            else:
                for role in ROLES:
                    self.slots[role] = _Slot(self._new_context(self._load_model(models.merged[role]), n_seq=1), 0)
        except BaseException:
            self.close()
            raise
        self._vocab = llama_cpp.llama_model_get_vocab(self._models[0])

    # loading

    def _load_model(self, path: Path):
        params = self._llama.llama_model_default_params()
        model = self._llama.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise ExarError(f"{path}: llama.cpp cannot load this GGUF ({native_reason()}); "
                            "re-export it with `exar-export`")
        self._models.append(model)
        return model

    def _load_adapter(self, model, path: Path):
        adapter = self._llama.llama_adapter_lora_init(model, str(path).encode())
        if not adapter:
            raise ExarError(f"{path}: llama.cpp cannot load this LoRA GGUF on {self.models.base.name} "
                            f"({native_reason()}); re-export it with `exar-export --mode adapters`")
        self._adapters.append(adapter)
        return adapter

    def _new_context(self, model, n_seq: int) -> _Context:
        llama = self._llama
        params = llama.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = params.n_ubatch = min(self.n_ctx, EDGE_BATCH)
        params.n_seq_max = n_seq
        params.kv_unified = True  # the roles' sequences share all n_ctx cells
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        if self.full_precision:
            params.type_k = params.type_v = llama.GGML_TYPE_F32
            params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ptr = llama.llama_init_from_model(model, params)
        if not ptr:
            raise ExarError(f"llama.cpp cannot create a context of {self.n_ctx} tokens ({native_reason()})")
        context = _Context(ptr, llama.llama_get_memory(ptr), None, llama.llama_n_ctx(ptr))
        self.n_ctx = context.n_ctx  # llama.cpp may round the size up
        self._contexts.append(context)
        context.batch = llama.llama_batch_init(params.n_batch, 0, 1)
        return context

    def close(self) -> None:
        """Free contexts, then adapters, then models (llama.cpp's order); safe to call twice."""
        llama = self._llama
        for context in self._contexts:
            if context.batch is not None:
                llama.llama_batch_free(context.batch)
            llama.llama_free(context.ptr)
        for adapter in self._adapters:
            llama.llama_adapter_lora_free(adapter)
        for model in self._models:
            llama.llama_model_free(model)
        self._contexts, self._adapters, self._models, self.slots = [], [], [], {}

    def __enter__(self) -> "LlamaRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # tokens

    def tokenize(self, text: str) -> list[int]:
        """Token ids as the base's HF tokenizer gives them: BOS when the model adds it, specials parsed."""
        data = text.encode("utf-8")
        size = len(data) + 8
        buffer = (self._llama.llama_token * size)()
        count = self._llama.llama_tokenize(self._vocab, data, len(data), buffer, size, True, True)
        if count < 0:
            raise ExarError(f"llama.cpp could not tokenize a text of {len(data)} bytes")
        return list(buffer[:count])

    def _piece(self, token: int) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        n = self._llama.llama_token_to_piece(self._vocab, token, buffer, 64, 0, False)
        return buffer.raw[:max(n, 0)]

    # forward passes

    def _activate(self, slot: _Slot) -> None:
        """Set the slot's adapter on its context unless it is already the one set."""
        context = slot.context
        if context.adapter is slot.adapter:
            return
        if slot.adapter is None:
            status = self._llama.llama_set_adapters_lora(context.ptr, None, 0, None)
        else:
            adapters = (self._llama.llama_adapter_lora_p_ctypes * 1)(slot.adapter)
            status = self._llama.llama_set_adapters_lora(context.ptr, adapters, 1, (ctypes.c_float * 1)(1.0))
        if status != 0:
            raise ExarError(f"llama.cpp refused to switch LoRA adapters (status {status})")
        context.adapter = slot.adapter

    def _make_room(self, slot: _Slot, needed: int) -> None:
        """Free other roles' cached prompts when this role's tokens would not fit the context."""
        context = slot.context
        if needed > context.n_ctx:
            raise ExarError(f"the prompt and answer need {needed} tokens, more than the context of "
                            f"{context.n_ctx}; raise --ctx or shorten the question/context")
        others = [s for s in self.slots.values() if s.context is context and s is not slot]
        if needed + sum(len(s.tokens) for s in others) > context.n_ctx:
            for other in others:
                self._llama.llama_memory_seq_rm(context.memory, other.seq, 0, -1)
                other.tokens = []

    def _decode(self, slot: _Slot, tokens: list[int], rows_from: int | None = None) -> list:
        """Append ``tokens`` to the slot's sequence; logits for the last one, and returned as
        NumPy rows for every token from index ``rows_from`` of ``tokens`` on when it is given."""
        import numpy as np

        context, batch = slot.context, slot.context.batch
        capacity = min(context.n_ctx, EDGE_BATCH)
        n_vocab = self._llama.llama_vocab_n_tokens(self._vocab)
        rows = []
        for start in range(0, len(tokens), capacity):
            chunk = tokens[start:start + capacity]
            position = len(slot.tokens)
            wanted = [] if rows_from is None else [i for i in range(len(chunk)) if start + i >= rows_from]
            for i, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = position + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = slot.seq
                batch.logits[i] = False
            for i in wanted + [len(chunk) - 1]:
                batch.logits[i] = True
            batch.n_tokens = len(chunk)
            status = self._llama.llama_decode(context.ptr, batch)
            if status != 0:
                raise ExarError(f"llama.cpp could not evaluate the prompt (llama_decode returned {status})")
            slot.tokens.extend(chunk)
            for i in wanted:
                pointer = self._llama.llama_get_logits_ith(context.ptr, i)
                rows.append(np.ctypeslib.as_array(pointer, shape=(n_vocab,)).copy())
        return rows

    def _prefill(self, role: str, prompt: str, reserve: int = 0) -> _Slot:
        """Evaluate ``prompt`` in the role's sequence, reusing its cached prefix; logits of the last token ready."""
        slot, _ = self._evaluate(role, self.tokenize(prompt), reserve=reserve)
        return slot

    def _evaluate(self, role: str, tokens: list[int], *, reserve: int = 0,
                  rows_from: int | None = None) -> tuple[_Slot, list]:
        """Bring the role's sequence to ``tokens``, evaluating only what its cache lacks (at least
        the last token, for fresh logits, and every token from ``rows_from`` on, whose logits it returns)."""
        slot = self.slots[role]
        self._activate(slot)
        keep = 0
        for cached, token in zip(slot.tokens, tokens):
            if cached != token:
                break
            keep += 1
        keep = min(keep, len(tokens) - 1, len(tokens) if rows_from is None else rows_from)
        self._make_room(slot, len(tokens) + reserve)
        self._llama.llama_memory_seq_rm(slot.context.memory, slot.seq, keep, -1)
        slot.tokens = slot.tokens[:keep]
        rows = self._decode(slot, tokens[keep:], None if rows_from is None else rows_from - keep)
        self.prompt_tokens["evaluated"] += len(tokens) - keep
        self.prompt_tokens["reused"] += keep
        return slot, rows

    def _last_row(self, slot: _Slot):
        """The logits the slot's last ``llama_decode`` left for its last token: a NumPy view, valid
        until the context decodes again."""
        import numpy as np

        n_vocab = self._llama.llama_vocab_n_tokens(self._vocab)
        pointer = self._llama.llama_get_logits_ith(slot.context.ptr, -1)
        return np.ctypeslib.as_array(pointer, shape=(n_vocab,))

    def last_logits(self, role: str, prompt: str):
        """Next-token logits of ``role`` after ``prompt`` (a NumPy copy), from one forward pass."""
        return self._last_row(self._prefill(role, prompt)).copy()

    def teacher_forced_logits(self, role: str, prompt_ids: list[int], target_ids: list[int]):
        """Logits predicting each of ``target_ids`` after ``prompt_ids`` and the targets before it
        (len(target_ids) x vocab, NumPy), from one pass over what the role's cache lacks (eval's
        perplexity and KL)."""
        import numpy as np

        if not prompt_ids or not target_ids:
            raise ExarError("teacher forcing needs a prompt and at least one target token")
        tokens = list(prompt_ids) + list(target_ids)
        _, rows = self._evaluate(role, tokens, rows_from=len(prompt_ids) - 1)
        return np.stack(rows[:len(target_ids)])

    # the Backend protocol

    def p_correct(self, prompt: str) -> tuple[float, float]:
        """p(CORRECT) from the labels' token sequences (``label_tokens``): one pass over the prompt
        when each label is one token, else each label's tokens evaluated on the prompt's cached KV."""
        start = time.perf_counter()
        labels = label_tokens(self.tokenize, prompt, self.style)
        context = list(labels.context)
        logp = {}
        if labels.single_token:
            slot, _ = self._evaluate("validator", context)
            row = log_softmax(self._last_row(slot))
            logp = {label: float(row[ids[0]]) for label, ids in labels.labels.items()}
        else:
            for label, ids in labels.labels.items():
                _, rows = self._evaluate("validator", context + list(ids), rows_from=len(context) - 1)
                logp[label] = float(sum(log_softmax(row)[token] for row, token in zip(rows, ids)))
        p = p_correct_from_logprobs(logp[CORRECT], logp[WRONG])
        return p, (time.perf_counter() - start) * 1000.0

    def generate(self, role: str, prompt: str, *, temperature: float, top_p: float, seed: int,
                 max_new_tokens: int) -> Generation:
        start = time.perf_counter()
        slot = self._prefill(role, prompt, reserve=max_new_tokens)
        sampler = self._sampler(temperature, top_p, seed)
        text, count, logprob_sum = b"", 0, 0.0
        try:
            while count < max_new_tokens:
                token = self._llama.llama_sampler_sample(sampler, slot.context.ptr, -1)
                if self._llama.llama_vocab_is_eog(self._vocab, token):
                    break
                count += 1
                logprob_sum += float(log_softmax(self._last_row(slot))[token])
                text += self._piece(token)
                if self._stopped(text) or count == max_new_tokens:
                    break
                self._decode(slot, [token])
        finally:
            self._llama.llama_sampler_free(sampler)
        answer = parse_answer(text.decode("utf-8", errors="ignore"), self.style)
        return Generation(answer, count, (time.perf_counter() - start) * 1000.0,
                          logprob_sum / count if count else None)

    def _sampler(self, temperature: float, top_p: float, seed: int):
        llama = self._llama
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        if temperature == 0:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
        else:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(top_p, 1))
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(temperature))
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def _stopped(self, text: bytes) -> bool:
        decoded = text.decode("utf-8", errors="ignore")
        return any(stop in decoded for stop in self._stop)


def open_runtime(run: Run, *, mode: str | None = None, quant: str | None = None, threads: int | None = None,
                 n_ctx: int = EDGE_CONTEXT, verbose: bool = False, full_precision: bool = False) -> LlamaRuntime:
    """The runtime for an exported run, laid out with the run's prompt style."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise ExarError("exar-edge needs llama-cpp-python: pip install 'exar[edge]'") from None
    style = PromptStyle.from_dict(run.settings.get("prompt") or {})
    return LlamaRuntime(find_models(run, mode=mode, quant=quant), style, threads=threads, n_ctx=n_ctx,
                        verbose=verbose, full_precision=full_precision)
