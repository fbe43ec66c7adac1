"""PEFT LoRA adapters: read and checked against their base, then written as a llama.cpp LoRA GGUF.

A LoRA GGUF (``general.type=adapter``, ``adapter.type=lora``, ``adapter.lora.alpha``) holds, per
adapted matrix W (out x in), ``<name>.lora_a`` = A (r x in) and ``<name>.lora_b`` = B (out x r)
with q/k rows interleaved like the base GGUF; llama.cpp adds ``alpha / r * B @ A`` to W at
run time, on top of any base, quantized or not.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from exar.errors import ExarError
from exar.export.hfmodel import LlamaShape, TensorSource, interleave_qk, safetensors_infos
from exar.rundir import atomic_path, read_json

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoraModule:
    """One adapted matrix: base tensor name, A (r x in), B (out x r) in fp32, and its PEFT scaling."""

    target: str
    a: object = None
    b: object = None
    scaling: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self):
        """scaling * B @ A, the change this adapter makes to the base matrix (fp32)."""
        return (self.b @ self.a) * self.scaling


@dataclass
class Adapter:
    folder: Path
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha", 8))

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 8))


def read_adapter(adapter_dir: Path | str, base_dir: Path | str, *, base_names: tuple[str, ...] = ()) -> Adapter:
    """A PEFT LoRA folder, checked against the HF base it must apply to.

    Refused: a missing or damaged file, DoRA and other non-plain-LoRA variants, fully trained
    modules (modules_to_save), embedding LoRA, and an adapter made on another base (its recorded
    base name differs from ``base_names``, or its matrices do not fit the base's shapes).
    """
    import torch
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise ExarError(f"{folder}: no {CONFIG} (not a PEFT adapter folder)")
    config = read_json(config_path)
    if config.get("peft_type", "LORA") != "LORA":
        raise ExarError(f"{config_path}: peft_type {config.get('peft_type')} is not LoRA")
    for flag, what in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save (fully trained modules)")):
        if config.get(flag):
            raise ExarError(f"{config_path}: {what} is not supported by the llama.cpp export; train a plain LoRA")
    recorded = config.get("base_model_name_or_path")
    if recorded and base_names and Path(recorded).name not in {Path(n).name for n in base_names if n}:
        raise ExarError(f"{config_path}: adapter made on another base ({recorded}), not the run's base ({base_names[0]})")

    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ExarError(f"{folder}: no {WEIGHTS}")
    safetensors_infos(weights)
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors' own error types
        raise ExarError(f"{weights}: cannot read ({e})") from None

    adapter = Adapter(folder, config)
    for key, tensor in tensors.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise ExarError(f"{weights}: tensor {key} is not a LoRA A/B matrix (embedding LoRA and extra tensors are not supported)")
        target = match["module"] + ".weight"
        module = adapter.modules.setdefault(target, LoraModule(target))
        setattr(module, match["part"].lower(), tensor.to(torch.float32))

    shape = LlamaShape.read(base_dir)
    base = TensorSource(base_dir)
    for target, module in adapter.modules.items():
        if module.a is None or module.b is None:
            raise ExarError(f"{weights}: {target} has only one of lora_A / lora_B")
        if target not in base:
            raise ExarError(f"{weights}: adapter made on another base: it adapts {target}, which {base_dir} lacks")
        out_features, in_features = base.infos[target].shape
        if tuple(module.b.shape) != (out_features, module.rank) or module.a.shape[1] != in_features:
            raise ExarError(f"{weights}: adapter made on another base: {target} is {out_features}x{in_features} in "
                            f"{base_dir}, the adapter expects {module.b.shape[0]}x{module.a.shape[1]}")
        if shape.tied and target == "lm_head.weight":
            raise ExarError(f"{weights}: adapts lm_head, which is tied to the embeddings in this base; llama.cpp cannot apply it")
        module.scaling = _scaling(config, target, module.rank)
    if not adapter.modules:
        raise ExarError(f"{weights}: holds no LoRA matrices")
    return adapter


def _scaling(config: dict, target: str, rank: int) -> float:
    """PEFT's lora_alpha / r (or / sqrt(r) with rsLoRA), honouring alpha_pattern."""
    module = target[: -len(".weight")]
    alpha = float(config.get("lora_alpha", 8))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def write_lora_gguf(adapter_dir: Path | str, base_hf_dir: Path | str, out_path: Path | str, *,
                    base_names: tuple[str, ...] = ()) -> dict:
    """Write the PEFT adapter ``adapter_dir`` (made on ``base_hf_dir``) as a llama.cpp LoRA GGUF."""
    import gguf
    import numpy as np

    from exar.export.writer import gguf_tensor_name

    adapter = read_adapter(adapter_dir, base_hf_dir, base_names=base_names)
    shape = LlamaShape.read(base_hf_dir)
    alpha = adapter.alpha
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(Path(adapter_dir).name)
    for target, module in sorted(adapter.modules.items()):
        name = gguf_tensor_name(target, shape.layers)
        b = module.b * (module.scaling * module.rank / alpha)  # llama.cpp scales by alpha / r; fold any difference into B
        heads = shape.qk_heads(target)
        if heads is not None:
            b = interleave_qk(b, heads)
        writer.add_tensor(f"{name}.lora_a", module.a.numpy().astype(np.float32))
        writer.add_tensor(f"{name}.lora_b", b.contiguous().numpy().astype(np.float32))
    with atomic_path(out_path) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"modules": len(adapter.modules), "rank": adapter.rank, "alpha": alpha}
