"""A tiny exported run for the edge tests, made with export's own writers (no llama.cpp converter).

Three random PEFT LoRA adapters (one per role, different seeds, non-zero B) on the tiny Llama;
exported as base + LoRA GGUFs (adapters mode) and as merged GGUFs (merged mode), all f32 so the
two modes can be compared closely, plus a q8_0 base so the runtime also runs quantized.
"""

from __future__ import annotations

from pathlib import Path

from exar.constants import ROLES
from exar.rundir import Run

LORA_RANK = 4
LORA_ALPHA = 8
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(base: Path, where: Path) -> dict[str, Path]:
    """A PEFT adapter folder per role, each with its own random (non-zero) A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = {}
    for seed, role in enumerate(ROLES, start=1):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, lora_dropout=0.0,
                            task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, 0.1)
        folders[role] = where / "adapters" / role
        peft_model.save_pretrained(str(folders[role]))
    return folders


def merge(base: Path, adapter: Path, dest: Path) -> Path:
    """The adapter merged into the base, saved as an HF folder with the base's tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from exar.export.hfmodel import copy_tokenizer_files

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(dest))
    copy_tokenizer_files(base, dest)
    return dest


def build_exported_run(root: Path, base: Path) -> Run:
    """A run with gguf/base.{f32,q8_0}.gguf, gguf/<role>.lora.gguf and gguf/<role>.f32.gguf recorded."""
    from exar.basemodel import prompt_style
    from exar.export.layout import gguf_rel, lora_rel
    from exar.export.lora import write_lora_gguf
    from exar.export.quantize import quantize_gguf
    from exar.export.writer import write_gguf

    run = Run.create(root)
    run.update_settings("prompt", prompt_style(base).to_dict())
    adapters = make_adapters(base, root)
    with run.writing(gguf_rel("base", "f32"), "gguf-base") as tmp:
        write_gguf(base, tmp, "f32", progress=False)
    with run.writing(gguf_rel("base", "q8_0"), "gguf-base") as tmp:
        quantize_gguf(run.path(gguf_rel("base", "f32")), tmp, "q8_0", threads=1)
    for role, adapter in adapters.items():
        with run.writing(lora_rel(role), "gguf-lora", role=role) as tmp:
            write_lora_gguf(adapter, base, tmp)
        merged = merge(base, adapter, root / "hf" / role)
        with run.writing(gguf_rel(role, "f32"), "gguf-merged", role=role) as tmp:
            write_gguf(merged, tmp, "f32", progress=False)
    return run
