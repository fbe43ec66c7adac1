"""What a variant name means, which run artifacts it loads, and opening it as ONE loop backend.

| variant          | backend        | loads                                                      |
|------------------|----------------|------------------------------------------------------------|
| ``hf``           | transformers   | the fp32 base + ``adapters/<role>/`` (PEFT, switched)       |
| ``hf-merged``    | transformers   | ``hf/<role>/`` merged folders                              |
| ``base``         | transformers   | the base alone for every role (the paper's vanilla model)  |
| ``gguf:<q>``     | llama.cpp      | ``gguf/<role>.<q>.gguf`` (merged)                          |
| ``adapters:<q>`` | llama.cpp      | ``gguf/base.<q>.gguf`` + ``gguf/<role>.lora.gguf``         |

llama.cpp runs with the edge runtime's own settings (what ships: f16 KV cache), except for ``f32``
GGUFs, which run in full precision throughout (f32 KV cache, no flash attention) so that
``gguf:f32`` isolates the conversion itself and must agree with ``hf``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from exar.constants import ROLES
from exar.errors import ExarError
from exar.rundir import Run

TRANSFORMERS_VARIANTS = {"hf": "adapters", "hf-merged": "merged", "base": "base"}
LLAMA_PREFIXES = {"gguf": "merged", "adapters": "adapters"}
FULL_PRECISION = "f32"


@dataclass(frozen=True)
class Variant:
    name: str              # as written: hf, hf-merged, base, gguf:q4_0, adapters:q4_0
    backend: str           # "transformers" or "llama.cpp"
    mode: str              # adapters | merged | base
    quant: str | None = None

    @property
    def slug(self) -> str:
        """The name as a file name (``gguf:q4_0`` -> ``gguf-q4_0``)."""
        return self.name.replace(":", "-")

    @property
    def full_precision(self) -> bool:
        return self.backend == "transformers" or self.quant == FULL_PRECISION

    def runtime_settings(self) -> dict:
        """How the arithmetic runs, for the report."""
        if self.backend == "transformers":
            return {"backend": "transformers", "dtype": "float32", "device": "cpu"}
        kv = "f32, flash attention off" if self.full_precision else "llama.cpp default (f16)"
        return {"backend": "llama.cpp", "mode": self.mode, "quant": self.quant, "kv_cache": kv}


def parse_variant(text: str) -> Variant:
    name = text.strip()
    if name in TRANSFORMERS_VARIANTS:
        return Variant(name, "transformers", TRANSFORMERS_VARIANTS[name])
    prefix, _, quant = name.partition(":")
    if prefix in LLAMA_PREFIXES and quant:
        return Variant(name, "llama.cpp", LLAMA_PREFIXES[prefix], quant)
    raise ExarError(f"unknown variant {name!r}; use hf, hf-merged, base, gguf:<quant> or adapters:<quant> "
                    "(e.g. gguf:q4_0)")


def parse_variants(text: str) -> list[Variant]:
    """``hf,gguf:f16,gguf:q4_0`` -> variants; the first is the reference the others are compared with."""
    variants = [parse_variant(part) for part in text.split(",") if part.strip()]
    if not variants:
        raise ExarError("--variants is empty; give at least one, e.g. hf,gguf:q4_0")
    names = [v.name for v in variants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ExarError(f"--variants names {', '.join(repeated)} twice")
    return variants


def artifacts(run: Run, variant: Variant) -> list[str]:
    """Run-relative paths of the manifest artifacts the variant loads; an error names what is missing."""
    from exar.eval.hf_backend import adapter_rel
    from exar.export.layout import hf_rel

    if variant.backend == "llama.cpp":
        from exar.edge.runtime import find_models

        try:
            models = find_models(run, mode=variant.mode, quant=variant.quant)
        except ExarError as e:
            raise ExarError(f"variant {variant.name}: {e}") from None
        return [Path(p).relative_to(run.root).as_posix() for p in models.files]
    if variant.mode == "base":
        return []
    rels = [adapter_rel(role) if variant.mode == "adapters" else hf_rel(role) for role in ROLES]
    for rel in rels:
        if run.entry(rel) is None or not run.path(rel).exists():
            stage = "exar-train" if variant.mode == "adapters" else "exar-export"
            raise ExarError(f"variant {variant.name}: the run {run.root} has no {rel}; run {stage} first")
    return rels


def model_bytes(run: Run, variant: Variant, rels: list[str]) -> int:
    """Bytes on disk of what the variant loads (the base's weight files count for the transformers modes)."""
    from exar.eval.hf_backend import base_folder

    total = sum(run.entry(rel)["bytes"] for rel in rels)
    if variant.backend == "transformers" and variant.mode != "merged":
        total += sum(p.stat().st_size for p in base_folder(run).glob("*.safetensors"))
    return total


def fingerprint(run: Run, rels: list[str]) -> str:
    """Identifies the weights a variant loads (manifest hashes + the run's base), for the generation cache."""
    parts = {"base": (run.settings.get("base") or {}).get("fingerprint"),
             "files": {rel: run.entry(rel)["sha256"] for rel in rels}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def open_variant(run: Run, variant: Variant, *, threads: int | None = None):
    """The variant as a loop backend that also gives ``tokenize`` and ``teacher_forced_logits``."""
    if variant.backend == "transformers":
        from exar.eval.hf_backend import open_hf_backend

        return open_hf_backend(run, variant.mode, threads=threads)
    from exar.edge.runtime import open_runtime

    return open_runtime(run, mode=variant.mode, quant=variant.quant, threads=threads,
                        full_precision=variant.full_precision)
