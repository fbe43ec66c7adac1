"""QLoRA speed and memory at Llama-2-7B shape on one GPU: exar's trainer against the best off-the-shelf setups.

Random weights at full Llama-2-7B shape (speed and memory do not depend on their values), quantized
to NF4 + double quant on the GPU, LoRA r=16 on q/k/v/o, dolly-like lengths (seeded lognormal,
median 99 tokens, clipped to [16, 512]), the same 32 examples per optimizer step in every recipe:

  plain        the seeds' recipe: trl SFTTrainer, rows padded to 512, batch 8 x 4 accumulation, SDPA,
               gradient checkpointing, prepare_model_for_kbit_training
  trl-default  trl alone as its docs set QLoRA up (peft_config to SFTTrainer), its defaults: rows padded
               to the longest of each micro-batch, 8 x 4, SDPA, no liger
  trl-flex     trl alone, its fastest flags: padding_free=True, use_liger_kernel=True,
               attn_implementation="flex_attention", gradient checkpointing, one micro-batch of 32
  unsloth      Unsloth's FastLanguageModel on the same weights (saved once to a folder), same LoRA
               rank and targets, its fast path (LoRA dropout 0), gradient checkpointing on the GPU,
               padding-free batches of 32; runs in its own process with its own site (--unsloth-site)
  exar         exar's trainer with its GPU defaults (exar.train.trainer.device_plan): trl-flex's
               configuration plus exar's fused NF4 + LoRA layers (exar.train.kernels)
  exar-flex    exar's trainer without exar's kernels: the trl-flex configuration through exar's code
  exar+LEVER   exar-flex with one lever (adamw: fused AdamW, keepN, expandable) or none (no-gc, d0);
               exar+kernels+adamw: exar's defaults with fused AdamW instead of paged 8-bit;
               exar+compile: exar's defaults with every decoder layer torch.compiled (inductor fuses
               what liger did, so liger is off; exar.train.kernels.compile_layers); +keep4: its last
               4 layers not checkpointed; +graphs: the compiled layers replayed as CUDA graphs;
               exar+offload: exar's defaults with what the backward keeps moved to host memory;
               exar+compile+offload: both
  trl-flex+compile  trl-flex with the Trainer's own torch_compile=True

Each recipe runs in its own process (clean peak memory; liger patches transformers' classes).
Only useful tokens count: the non-padding tokens of the examples. Tokens/s is over all timed steps
(the same examples in every recipe), with the median and range of the per-step rates beside it.
Memory: peak allocated and peak reserved (what the GPU has to hold). MFU counts the matrix
products done for the useful tokens: 2 x N forward + 2 x N backward (frozen base: no weight
gradients) + 2 x N again for every layer that gradient checkpointing recomputes, over the bf16
matrix rate measured here by an 8192^3 torch.matmul.

    python bench/train_gpu.py --recipes plain,trl-default,trl-flex,unsloth,exar --unsloth-site /tmp/usite
    python bench/train_gpu.py --recipes trl-flex,exar-flex,exar,exar+adamw,exar+keep4 --json out.json
    python bench/train_gpu.py --recipes trl-flex,exar --profile 2   # where one step's GPU time goes
    python bench/train_gpu.py --recipes exar --processes 1,2      # DDP scaling, same global batch
    python bench/train_gpu.py --shape tiny --device cpu --recipes plain,trl-flex,exar  # the logic, no GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
# The same architecture, tiny: checks this script's logic on a CPU in seconds.
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024, rms_norm_eps=1e-5)
SHAPES = {"llama2-7b": LLAMA2_7B, "tiny": TINY}

MEDIAN_TOKENS, LENGTH_SIGMA, MIN_TOKENS, MAX_TOKENS = 99, 0.8, 16, 512
EXAMPLES_PER_STEP = 32
LORA = dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], bias="none")
LORA_DROPOUT = 0.05   # exar's default (exar.constants.LORA_DROPOUT) and the seeds'
PEERS = ("trl-flex", "unsloth")  # the off-the-shelf setups exar must beat
LOSS_REFERENCE = "trl-flex"


@dataclass(frozen=True)
class Recipe:
    """How one recipe batches and computes. ``exar`` recipes take exar's device plan and change ``plan``'s fields."""

    name: str
    kind: str                       # plain | trl | unsloth | exar
    padding_free: bool = True
    attention: str = "flex_attention"
    liger: bool = True
    gradient_checkpointing: bool = True
    grad_accum: int = 1             # micro-batches per optimizer step; the examples per step are the same for all
    pad_to: int | None = None       # padded recipes: every row padded to this many tokens (None: the longest)
    lora_dropout: float = LORA_DROPOUT
    plan: tuple = ()                # exar: (DevicePlan field, value) pairs changed from exar's defaults
    alloc: str = ""                 # PYTORCH_CUDA_ALLOC_CONF for the recipe's process
    torch_compile: bool = False     # trl recipes: the Trainer's own torch_compile=True (the whole model)
    inductor: tuple = ()            # (torch._inductor.config key, value) pairs set while the recipe trains
    offload: bool = False           # every tensor saved for the backward waits in pinned host memory
    notes: str = ""


FLEX = (("kernels", False), ("keep_layers", 0), ("optimizer", "paged_adamw_8bit"))  # exar's code, trl-flex's choices
RECIPES = {r.name: r for r in [
    Recipe("plain", "plain", padding_free=False, attention="sdpa", liger=False, grad_accum=4, pad_to=MAX_TOKENS),
    Recipe("trl-default", "trl", padding_free=False, attention="sdpa", liger=False, grad_accum=4),
    Recipe("trl-flex", "trl"),
    Recipe("trl-flex+compile", "trl", torch_compile=True, notes="trl-flex with the Trainer's torch_compile=True"),
    Recipe("unsloth", "unsloth", attention="unsloth", liger=False, lora_dropout=0.0,
           notes="FastLanguageModel, LoRA dropout 0 (its fast path), checkpointing without CPU offload"),
    Recipe("unsloth-offload", "unsloth", attention="unsloth", liger=False, lora_dropout=0.0,
           notes="Unsloth's default checkpointing (activations offloaded to the CPU)"),
    Recipe("exar", "exar"),
    Recipe("exar-flex", "exar", plan=FLEX),
    Recipe("exar+adamw", "exar", plan=(("kernels", False), ("keep_layers", 0), ("optimizer", "adamw_torch_fused"))),
    Recipe("exar+kernels+adamw", "exar", plan=(("optimizer", "adamw_torch_fused"),)),
    Recipe("exar+keep4", "exar", plan=(*FLEX[:1], ("keep_layers", 4), FLEX[2])),
    Recipe("exar+keep8", "exar", plan=(*FLEX[:1], ("keep_layers", 8), FLEX[2])),
    Recipe("exar+expandable", "exar", plan=FLEX, alloc="expandable_segments:True"),
    Recipe("exar-no-gc", "exar", plan=FLEX, gradient_checkpointing=False),
    Recipe("exar+compile", "exar", plan=(("compile", True), ("liger", False))),
    Recipe("exar+compile+keep4", "exar", plan=(("compile", True), ("liger", False), ("keep_layers", 4))),
    Recipe("exar+compile+graphs", "exar", plan=(("compile", True), ("liger", False)),
           inductor=(("triton.cudagraphs", True),),
           notes="compiled layers replayed as CUDA graphs (torch.compile's reduce-overhead), one graph per row length"),
    Recipe("exar+offload", "exar", offload=True,
           notes="exar's defaults, what the backward needs (checkpointed layers' inputs) kept in host memory"),
    Recipe("exar+compile+offload", "exar", plan=(("compile", True), ("liger", False)), offload=True,
           notes="compiled layers, the checkpointed layers' inputs kept in host memory"),
    Recipe("exar-d0", "exar", lora_dropout=0.0, notes="exar's defaults with Unsloth's LoRA dropout 0"),
]}


def dolly_like_rows(count: int, vocab: int, seed: int) -> list[dict]:
    """Token rows with dolly-like lengths (lognormal around the median, clipped); the first half is prompt."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(rng.lognormal(np.log(MEDIAN_TOKENS), LENGTH_SIGMA, count)), MIN_TOKENS, MAX_TOKENS)
    rows = []
    for length in lengths.astype(int):
        ids = [1, *rng.integers(3, vocab, length - 1).tolist()]
        prompt = length // 2
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def random_llama(shape: dict, attention: str, seed: int, device: str):
    """A randomly initialised Llama built on ``device`` (bf16 on a GPU): the same weights for every seed."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)


def random_llama_nf4(shape: dict, attention: str, seed: int, device: str):
    """``random_llama`` with every decoder Linear replaced by NF4 (double quant), as a 4-bit load would."""
    import bitsandbytes as bnb
    import torch

    model = random_llama(shape, attention, seed, device)
    dtype = model.dtype
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                                  compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                                  device="meta")
                    quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                                         compress_statistics=True, quant_type="nf4",
                                                         module=quantized)._quantize(device)
                    setattr(parent, name, quantized)
    model.is_loaded_in_4bit = True  # what transformers' bitsandbytes loader sets; peft and trl read it
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return model


def matmul_tflops(device: str) -> float:
    """Measured bf16 matrix rate: median of timed 8192^3 products on random data."""
    import torch

    if not device.startswith("cuda"):
        return float("nan")
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * 8192**3 / statistics.median(times) / 1e12


class TokenCounter:
    """Counts the useful tokens and examples each forward pass sees (padding excluded)."""

    def __init__(self):
        import torch

        self.tokens = 0
        self.examples = 0
        self.count = torch.compiler.disable(self.count)

    def __call__(self, module, args, kwargs):
        self.count(kwargs)

    def count(self, kwargs):
        """Outside any compiled graph (a recipe that compiles the whole model would trace this hook)."""
        ids = kwargs.get("input_ids")
        if ids is None:
            return
        if kwargs.get("attention_mask") is not None:
            self.tokens += int(kwargs["attention_mask"].sum())
            self.examples += ids.shape[0]
        else:
            positions = kwargs["position_ids"]
            self.tokens += ids.numel()
            self.examples += int((positions == 0).sum())


def step_clock(counter: TokenCounter, device: str, profile_from: int = -1, profile_steps: int = 0):
    """A callback marking (time, useful tokens, examples) after every optimizer step; optionally profiling
    ``profile_steps`` steps from step ``profile_from`` with torch.profiler."""
    import torch
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []
            self.profiler = None
            self.profile = None

        def on_train_begin(self, args, state, control, **kwargs):
            self._mark()

        def on_step_begin(self, args, state, control, **kwargs):
            if profile_steps and state.global_step == profile_from:
                self.profiler = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                self.profiler.__enter__()
                self.profile_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self._mark()
            if self.profiler is not None and state.global_step == profile_from + profile_steps:
                wall = time.perf_counter() - self.profile_start
                self.profiler.__exit__(None, None, None)
                self.profile = profile_summary(self.profiler, wall, profile_steps)
                self.profiler = None

        def _mark(self):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), counter.tokens, counter.examples))

    return Clock()


def profile_summary(profiler, wall_s: float, steps: int, top: int = 30) -> dict:
    """GPU busy time per step against wall time, and the kernels that take it, grouped by name."""
    events = [e for e in profiler.key_averages() if str(e.device_type).endswith("CUDA")]  # kernels, not ops
    busy_us = sum(e.self_device_time_total for e in events) or 1.0
    rows = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    lines = [f"{'ms/step':>8} {'share':>6} {'calls/step':>10}  kernel"]
    for e in rows:
        lines.append(f"{e.self_device_time_total / 1000 / steps:>8.2f} {e.self_device_time_total / busy_us:>6.1%} "
                     f"{e.count / steps:>10.0f}  {e.key[:110]}")
    cpu = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    lines.append(f"{'cpu ms/step':>11} {'calls/step':>10}  op (host time)")
    for e in cpu:
        lines.append(f"{e.self_cpu_time_total / 1000 / steps:>11.2f} {e.count / steps:>10.0f}  {e.key[:100]}")
    return {"wall_ms_per_step": 1000 * wall_s / steps, "gpu_busy_ms_per_step": busy_us / 1000 / steps,
            "table": "\n".join(lines)}


def lora_config(recipe: Recipe):
    from peft import LoraConfig

    return LoraConfig(**LORA, lora_dropout=recipe.lora_dropout, task_type="CAUSAL_LM")


def sft_config(recipe: Recipe, work: Path, batch: int, steps: int, seed: int, device: str, **overrides):
    """trl's SFTConfig as a user of each recipe writes it: the same optimizer, schedule and seeds for all."""
    from trl import SFTConfig

    cuda = device.startswith("cuda")
    values = dict(
        output_dir=str(work), max_steps=steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=recipe.grad_accum, learning_rate=2e-4, lr_scheduler_type="constant",
        optim="paged_adamw_8bit" if cuda else "adamw_torch", bf16=cuda,
        gradient_checkpointing=recipe.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=MAX_TOKENS, logging_steps=1, save_strategy="no", report_to="none", seed=seed, data_seed=seed,
        dataloader_num_workers=0, use_cpu=not cuda,
    )
    if recipe.padding_free:
        values.update(padding_free=True, max_length=None)  # the rows are already cut to MAX_TOKENS
    if recipe.pad_to:
        values.update(pad_to_multiple_of=recipe.pad_to)
    if recipe.liger:
        values.update(use_liger_kernel=True)
    if recipe.torch_compile:
        values.update(torch_compile=True)
    values.update(overrides)
    return SFTConfig(**values)


def plain_trainer(model, tokenizer, rows, recipe: Recipe, batch: int, steps: int, seed: int, work: Path, device: str):
    """The seeds' recipe: peft's k-bit preparation, rows padded to 512, SFTTrainer."""
    from datasets import Dataset
    from peft import get_peft_model, prepare_model_for_kbit_training
    from trl import SFTTrainer

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.gradient_checkpointing)
    model = get_peft_model(model, lora_config(recipe))
    return SFTTrainer(model=model, args=sft_config(recipe, work, batch, steps, seed, device),
                      processing_class=tokenizer, train_dataset=Dataset.from_list(rows))


def trl_trainer(model, tokenizer, rows, recipe: Recipe, batch: int, steps: int, seed: int, work: Path, device: str):
    """trl alone: the quantized model and a LoraConfig handed to SFTTrainer, which makes the peft model."""
    from datasets import Dataset
    from trl import SFTTrainer

    return SFTTrainer(model=model, args=sft_config(recipe, work, batch, steps, seed, device), processing_class=tokenizer,
                      train_dataset=Dataset.from_list(rows), peft_config=lora_config(recipe))


def exar_plan(recipe: Recipe):
    """exar's device plan with the recipe's changes."""
    from exar.train.trainer import device_plan

    return replace(device_plan(4), **dict(recipe.plan))


def exar_trainer(model, tokenizer, rows, recipe: Recipe, plan, batch: int, steps: int, seed: int, work: Path):
    """exar's trainer: its model preparation and SFTTrainer set-up (exar.train.trainer)."""
    from exar.train.settings import TrainSettings
    from exar.train.trainer import build_trainer, prepare_model

    settings = TrainSettings(max_steps=steps, batch_size=batch, grad_accum=recipe.grad_accum,
                             lr=2e-4, warmup_ratio=0.0, scheduler="constant_with_warmup",
                             save_steps=10_000, seed=seed, max_seq_len=MAX_TOKENS, lora_dropout=recipe.lora_dropout,
                             gradient_checkpointing=recipe.gradient_checkpointing)
    return build_trainer(prepare_model(model, settings, plan), tokenizer, rows, [], settings, plan, work)


def unsloth_trainer(folder: Path, rows, recipe: Recipe, batch: int, steps: int, seed: int, work: Path):
    """Unsloth's own set-up on the saved random weights: FastLanguageModel, its get_peft_model, its SFTTrainer."""
    import unsloth  # noqa: F401  must come before transformers, trl and peft (it patches them)
    import torch
    from datasets import Dataset
    from trl import SFTTrainer
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(str(folder), max_seq_length=MAX_TOKENS, dtype=torch.bfloat16,
                                                         load_in_4bit=True, local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=LORA["r"], lora_alpha=LORA["lora_alpha"], target_modules=LORA["target_modules"],
        lora_dropout=recipe.lora_dropout, bias="none", random_state=seed,
        use_gradient_checkpointing="unsloth" if recipe.name == "unsloth-offload" else True)
    # Unsloth turned its own checkpointing on above; the Trainer must not wrap the layers a second time
    config = sft_config(replace(recipe, liger=False), work, batch, steps, seed, "cuda", dataset_num_proc=1,
                        gradient_checkpointing=False)
    return SFTTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=Dataset.from_list(rows))


def save_random_folder(shape: str, seed: int, folder: Path) -> None:
    """The bf16 random weights every recipe starts from, as an HF folder (Unsloth loads models by name)."""
    import torch

    if (folder / "config.json").is_file():
        return
    partial = folder.with_name(folder.name + ".partial")
    model = random_llama(SHAPES[shape], "sdpa", seed, "cuda" if torch.cuda.is_available() else "cpu")
    model.save_pretrained(str(partial))
    _tokenizer(SHAPES[shape]["vocab_size"]).save_pretrained(str(partial))
    partial.rename(folder)


def run_child(recipe: Recipe, shape: str, steps: int, warmup: int, seed: int, device: str, per_step: int,
              folder: Path | None, profile: int) -> dict:
    """One recipe, timed after ``warmup`` optimizer steps; returns its figures.

    Under ``accelerate launch`` (DDP) each process takes ``per_step / processes`` examples a step,
    so the global batch, and with it the losses, match a one-GPU run.
    """
    import tempfile

    started = time.perf_counter()
    if recipe.kind == "unsloth":
        import unsloth  # noqa: F401  first, before torch's friends
    import torch
    import torch._inductor.config
    from accelerate import PartialState

    state = PartialState()
    if device == "cuda":
        device = f"cuda:{state.local_process_index}"
        torch.cuda.set_device(device)
    world = state.num_processes
    batch = per_step // world // recipe.grad_accum
    total = warmup + steps + profile  # profiled steps come after the timed ones (the profiler slows them)
    rows = dolly_like_rows(per_step * total, SHAPES[shape]["vocab_size"], seed)
    plan = exar_plan(recipe) if recipe.kind == "exar" else None
    counter = TokenCounter()
    with tempfile.TemporaryDirectory() as work:
        if recipe.kind == "unsloth":
            trainer = unsloth_trainer(folder, rows, recipe, batch, total, seed, Path(work))
        else:
            tokenizer = _tokenizer(SHAPES[shape]["vocab_size"])
            attention = plan.attention if plan else recipe.attention
            model = random_llama_nf4(SHAPES[shape], attention, seed, device)
            model.config.use_cache = False  # every recipe trains without a KV cache (exar's load_model(for_training))
            build = {"plain": plain_trainer, "trl": trl_trainer}.get(recipe.kind)
            if build:
                trainer = build(model, tokenizer, rows, recipe, batch, total, seed, Path(work), device)
            else:
                trainer = exar_trainer(model, tokenizer, rows, recipe, plan, batch, total, seed, Path(work))
        trainer.model.register_forward_pre_hook(counter, with_kwargs=True)
        if recipe.offload:
            offload_saved_tensors(trainer, pin_memory=device.startswith("cuda"))
        clock = step_clock(counter, device, warmup + steps, profile)
        trainer.add_callback(clock)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        setup_s = time.perf_counter() - started
        with torch._inductor.config.patch(dict(recipe.inductor)):
            trainer.train()
    marks = clock.marks
    timed = marks[warmup:warmup + steps + 1]
    step_s = [b[0] - a[0] for a, b in zip(timed, timed[1:])]
    step_tokens = [b[1] - a[1] for a, b in zip(timed, timed[1:])]
    (t0, n0, e0), (t1, n1, e1) = timed[0], timed[-1]
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row][:warmup + steps]
    seen = torch.tensor([n1 - n0, e1 - e0], dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(seen)  # tokens and examples of every process
    cuda = device.startswith("cuda")
    recompute = recomputed_fraction(recipe, plan, SHAPES[shape]["num_hidden_layers"])
    return {
        "recipe": recipe.name, **asdict(recipe), "per_device_batch": batch,
        **({"plan": plan.to_dict()} if plan else {}),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "processes": world, "steps_timed": steps, "warmup_steps": warmup,
        "examples_per_step": float(seen[1]) / steps,
        "useful_tokens_per_s": float(seen[0]) / (t1 - t0),
        "step_s": step_s, "step_tokens": step_tokens,
        "recomputed_fraction": recompute,
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan"),
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if cuda else float("nan"),
        "losses": losses,
        "setup_s": setup_s,
        "warmup_s": timed[0][0] - marks[0][0],
        **({"profile": clock.profile} if clock.profile else {}),
    }


def offload_saved_tensors(trainer, pin_memory: bool) -> None:
    """Run the trainer's forward under ``torch.autograd.graph.save_on_cpu``: what the backward needs
    goes to host memory and comes back when the backward reaches it (the activation offload lever)."""
    import torch

    compute_loss = trainer.compute_loss

    def offloaded(*args, **kwargs):
        with torch.autograd.graph.save_on_cpu(pin_memory=pin_memory):
            return compute_loss(*args, **kwargs)

    trainer.compute_loss = offloaded


def recomputed_fraction(recipe: Recipe, plan, layers: int) -> float:
    """The share of decoder layers whose forward gradient checkpointing runs twice."""
    if not recipe.gradient_checkpointing:
        return 0.0
    keep = getattr(plan, "keep_layers", 0) if plan else 0
    return max(layers - keep, 0) / layers


def _tokenizer(vocab: int):
    """A tokenizer object SFTTrainer needs for padding; rows come tokenized already."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab_map = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab_map, unk_token="<unk>")),
                                        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    return tokenizer


def matmul_params(shape: dict) -> tuple[int, int]:
    """(decoder, LM head) parameters that take part in matrix products (the embedding table does not)."""
    h, i, layers, vocab = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i), h * vocab


def flops_per_token(shape: dict, recomputed: float) -> float:
    """2N forward + 2N input gradients (no weight gradients for the frozen base; LoRA's are < 1%) + 2N for
    each recomputed decoder layer; attention's own products (documents of ~130 tokens: ~1%) left out."""
    decoder, head = matmul_params(shape)
    return 4 * (decoder + head) + 2 * decoder * recomputed


def summarize(r: dict, tflops: float, shape: dict) -> dict:
    rates = sorted(n / s for n, s in zip(r["step_tokens"], r["step_s"]))
    return {"tok_s": r["useful_tokens_per_s"], "step_median": statistics.median(r["step_s"]),
            "rate_median": statistics.median(rates), "rate_min": rates[0], "rate_max": rates[-1],
            "mfu": flops_per_token(shape, r["recomputed_fraction"]) * r["useful_tokens_per_s"] / r["processes"]
            / (tflops * 1e12)}


def table(results: list[dict], tflops: float, shape: dict) -> str:
    """One row per run: rates with their spread, both memory peaks, MFU, ratios to the best peer, loss gap."""
    one_gpu = {r["recipe"]: r for r in results if r["processes"] == 1}
    peers = [one_gpu[p] for p in PEERS if p in one_gpu]
    best = max(peers, key=lambda r: r["useful_tokens_per_s"], default=None)
    reference = one_gpu.get(LOSS_REFERENCE)
    width = max([len(r["recipe"]) for r in results] + [16])
    head = (f"{'recipe':<{width}} {'GPUs':>4} {'tok/s':>7} {'per-step median [min-max]':>26} {'step s':>6} "
            f"{'alloc':>6} {'resvd':>6} {'MFU':>6} {'x best':>6} {'|dloss|':>8}")
    lines = [f"best peer: {best['recipe'] if best else 'none measured'}", head]
    for r in results:
        s = summarize(r, tflops, shape)
        ratio = r["useful_tokens_per_s"] / best["useful_tokens_per_s"] if best else float("nan")
        gap = loss_gap(r, reference)
        lines.append(f"{r['recipe']:<{width}} {r['processes']:>4} {s['tok_s']:>7.0f} "
                     f"{s['rate_median']:>9.0f} [{s['rate_min']:>6.0f}-{s['rate_max']:>6.0f}] {s['step_median']:>6.3f} "
                     f"{r['peak_allocated_gib']:>6.2f} {r['peak_reserved_gib']:>6.2f} {s['mfu']:>6.1%} {ratio:>6.2f} "
                     f"{gap:>8.4f}")
    return "\n".join(lines)


def loss_gap(r: dict, reference: dict | None) -> float:
    """Largest step-by-step loss difference against the reference recipe (same examples, same seeds)."""
    if reference is None or not r["losses"]:
        return float("nan")
    pairs = list(zip(r["losses"], reference["losses"]))
    return max(abs(a - b) for a, b in pairs) if pairs else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default="plain,trl-default,trl-flex,unsloth,exar",
                        help=f"comma list of {', '.join(RECIPES)}")
    parser.add_argument("--shape", choices=SHAPES, default="llama2-7b")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per recipe")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first (compilation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples-per-step", type=int, default=EXAMPLES_PER_STEP,
                        help="global batch: examples per optimizer step, over all GPUs")
    parser.add_argument("--processes", default="1",
                        help="comma list of GPU counts; more than 1 runs under accelerate launch (DDP)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to check the script with --shape tiny")
    parser.add_argument("--unsloth-site", type=Path, default=None,
                        help="a folder holding Unsloth and its trl/datasets (../shared/tools/device-unsloth.sh); "
                             "the unsloth recipes run with it first on PYTHONPATH")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/exar-bench-llama"),
                        help="where the random bf16 weights are saved for Unsloth (made once)")
    parser.add_argument("--profile", type=int, default=0, help="profile this many more steps after the timed ones")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--child-logs", type=Path, default=None,
                        help="write each recipe's stderr to DIR/NN-RECIPE.log (NN: its place in the run) as it runs (kept if the bench is killed)")
    parser.add_argument("--recipe-timeout", type=float, default=None, metavar="SECONDS",
                        help="stop a recipe that runs longer and record it as not measured (one slow lever "
                             "cannot take the others' time)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    folder = args.folder.with_name(f"{args.folder.name}-{args.shape}-{args.seed}")
    common = ["--shape", args.shape, "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed),
              "--device", args.device, "--examples-per-step", str(args.examples_per_step), "--folder", str(args.folder),
              "--profile", str(args.profile)]
    if args.child == "save-folder":
        save_random_folder(args.shape, args.seed, folder)
        return 0
    if args.child:
        result = run_child(RECIPES[args.child], args.shape, args.steps, args.warmup, args.seed, args.device,
                           args.examples_per_step, folder, args.profile)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return 0

    names = args.recipes.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    runs = [(name, int(n)) for name in names for n in args.processes.split(",")]
    results, failures = [], []
    for index, (name, processes) in enumerate(runs):
        recipe = RECIPES[name]
        started = time.perf_counter()
        env = child_env(recipe, processes, args.unsloth_site)
        if recipe.kind == "unsloth":
            if args.unsloth_site is None:
                failures.append(f"{name}: needs --unsloth-site")
                continue
            subprocess.run([sys.executable, __file__, "--child", "save-folder", *common], check=True, env=env)
        launch = [sys.executable] if processes == 1 else \
            [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
        proc = run_logged([*launch, __file__, "--child", name, *common], env, args.child_logs,
                          f"{index + 1:02d}-{name}", args.recipe_timeout)
        found = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not found:
            failures.append(f"{name} x{processes}: exit {proc.returncode}: {last_error(proc.stderr)}")
            print(f"{name} x{processes}: failed (exit {proc.returncode})\n{proc.stderr[-6000:]}", file=sys.stderr)
            continue
        results.append(json.loads(found[-1]))
        profile = results[-1].pop("profile", None)
        print(f"{name} x{processes}: {time.perf_counter() - started:.0f} s; {json.dumps(results[-1])}", flush=True)
        if profile:
            results[-1]["profile"] = profile
            print(f"profile of {name}: {profile['wall_ms_per_step']:.0f} ms wall, "
                  f"{profile['gpu_busy_ms_per_step']:.0f} ms GPU busy per step\n{profile['table']}", flush=True)
    tflops = matmul_tflops(args.device)
    report = {"date": time.strftime("%Y-%m-%d"), "shape": args.shape, "matmul_bf16_tflops": tflops,
              "matmul_params": matmul_params(SHAPES[args.shape]), "results": results, "failures": failures}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(f"\nQLoRA at {args.shape} shape, NF4, LoRA r=16 q/k/v/o, {args.examples_per_step} examples per optimizer step, "
          f"{args.steps} timed steps after {args.warmup}; bf16 matmul measured at {tflops:.0f} TFLOP/s")
    print(table(results, tflops, SHAPES[args.shape]))
    for failure in failures:
        print(f"not measured: {failure}")
    return 0 if not failures else 1


def child_env(recipe: Recipe, processes: int, unsloth_site: Path | None) -> dict:
    """The child's environment: one visible GPU for one process, the recipe's allocator, Unsloth's own site."""
    env = dict(os.environ)
    if processes == 1:  # with more visible GPUs Trainer would fall back to DataParallel
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    if recipe.alloc:
        env["PYTORCH_CUDA_ALLOC_CONF"] = recipe.alloc
    if recipe.kind == "unsloth" and unsloth_site is not None:
        env["PYTHONPATH"] = str(unsloth_site)  # Unsloth pins trl<=1.15 and datasets<5: apart from exar's stack
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1")
    return env


def run_logged(command: list[str], env: dict, logs: Path | None, name: str, timeout: float | None = None):
    """Run one recipe's process; its stderr goes to ``logs/NAME.log`` when given (else memory).

    A process still running after ``timeout`` seconds is killed and reported as failed, saying so."""
    path = None
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / f"{name}.log"
    with path.open("w") if path else contextlib.nullcontext(subprocess.PIPE) as err:
        try:
            proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as stopped:
            out = stopped.stdout.decode(errors="replace") if isinstance(stopped.stdout, bytes) else stopped.stdout
            err_text = stopped.stderr.decode(errors="replace") if isinstance(stopped.stderr, bytes) else stopped.stderr
            proc = subprocess.CompletedProcess(command, -9, out or "", (err_text or "") +
                                               f"\nError: ran past the recipe time limit of {timeout:.0f} s")
    if path:
        proc.stderr = path.read_text(errors="replace") + (proc.stderr or "")
    return proc


def last_error(stderr: str) -> str:
    """The last line of a child's traceback that says what went wrong."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["no output"])[-1][:300]


if __name__ == "__main__":
    sys.exit(main())
