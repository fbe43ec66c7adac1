"""Where export puts things in a run: the one place edge and eval learn the file names from.

``gguf/base.<variant>.gguf`` (variant = an outtype such as f16, or a quant such as q4_0),
``gguf/<role>.<variant>.gguf`` (merged), ``gguf/<role>.lora.gguf``, ``hf/<role>/``,
``consolidated/<role>/``, Modelfiles beside the GGUFs, and the llama.cpp native log.
"""

from __future__ import annotations

from pathlib import Path

from exar.constants import CONSOLIDATED_DIR, GGUF_DIR, HF_DIR, ROLES
from exar.errors import ExarError

BASE = "base"
LORA = "lora"
OUTTYPES = ("f16", "bf16", "f32")
MODES = ("merged", "adapters", "both")
LOG_REL = f"{GGUF_DIR}/llama-cpp.log"


def _check_name(name: str) -> None:
    if name != BASE and name not in ROLES:
        raise ExarError(f"unknown model name {name!r}; use 'base' or a role ({', '.join(ROLES)})")


def gguf_rel(name: str, variant: str) -> str:
    """Run-relative path of a GGUF: ``gguf_rel('base', 'q4_0')``, ``gguf_rel('exar', 'lora')``."""
    _check_name(name)
    if variant == LORA and name == BASE:
        raise ExarError("the base model has no LoRA file; use a role name")
    return f"{GGUF_DIR}/{name}.{variant}.gguf"


def gguf_path(run_root: Path | str, name: str, variant: str) -> Path:
    """Absolute path of a GGUF in the run folder ``run_root`` (see ``gguf_rel``)."""
    return Path(run_root) / gguf_rel(name, variant)


def lora_rel(role: str) -> str:
    return gguf_rel(role, LORA)


def hf_rel(role: str) -> str:
    _check_name(role)
    return f"{HF_DIR}/{role}"


def consolidated_rel(role: str) -> str:
    _check_name(role)
    return f"{CONSOLIDATED_DIR}/{role}"


def modelfile_rel(role: str, quant: str, adapters: bool) -> str:
    """Ollama Modelfile of a role: merged (``<role>.<quant>.Modelfile``) or base + adapter."""
    _check_name(role)
    middle = f"{LORA}.{quant}" if adapters else quant
    return f"{GGUF_DIR}/{role}.{middle}.Modelfile"
