"""Builders for export tests: PEFT adapters made on the spot and runs holding them."""

from __future__ import annotations

from pathlib import Path

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir: Path, out_dir: Path, *, seed: int = 0, targets=ALL_LINEAR, r: int = 8, alpha: int = 16,
                 spread: float = 0.05) -> Path:
    """A PEFT LoRA on ``base_dir`` whose lora_B is a seeded normal, so it really changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * spread)
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


def make_run(root: Path, base_dir: Path, roles=("answer", "validator", "exar"), targets=ALL_LINEAR):
    """A run bound to ``base_dir`` with one adapter per role recorded, as the train stage leaves it."""
    from exar.basemodel import prompt_style, resolve_base
    from exar.rundir import Run

    run = Run.create(root)
    base = resolve_base(base_dir)
    run.bind_base(base.to_dict())
    run.update_settings("prompt", prompt_style(base_dir).to_dict())
    for seed, role in enumerate(roles):
        rel = f"adapters/{role}"
        make_adapter(base_dir, run.path(rel), seed=seed, targets=targets)
        run.record(rel, "adapter", role=role)
    return run
