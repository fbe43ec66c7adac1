"""QLoRA speed and memory at Llama-2-7B shape on one GPU: the seeds' plain recipe against exar's trainer.

Random weights at full Llama-2-7B shape (speed and memory do not depend on their values), quantized
to NF4 + double quant on the GPU, LoRA r=16 on q/k/v/o, dolly-like lengths (seeded lognormal,
median 99 tokens, clipped to [16, 512]), the same 32 examples per optimizer step in every recipe:

  plain   the recipe the seeds used: trl SFTTrainer, rows padded to 512, batch 8 x 4 accumulation,
          SDPA attention, gradient checkpointing, prepare_model_for_kbit_training
  exar    exar's trainer with its GPU defaults (exar.train.trainer): the same 32 examples in one
          padding-free row whose examples do not see each other (position ids restart; flex
          attention's document mask skips the blocks between examples), liger-kernel fused ops

Each recipe runs in its own process (clean peak memory; liger patches transformers' classes).
Only useful tokens count: the non-padding tokens of the examples. MFU = 6 x matmul parameters x
useful tokens/s over the bf16 matrix rate measured here by an 8192^3 torch.matmul.

    python bench/train_gpu.py                        # plain and exar, then the table and ratios
    python bench/train_gpu.py --recipes plain,exar,exar-no-gc,exar-sdpa --json out.json   # levers
    python bench/train_gpu.py --recipes exar --processes 1,2     # DDP scaling, same global batch
    python bench/train_gpu.py --shape tiny --device cpu          # this script's logic, no GPU
"""

from __future__ import annotations

import argparse
import json
import os
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


@dataclass(frozen=True)
class Recipe:
    """How one recipe batches and computes; ``exar_defaults`` takes these from exar's trainer instead."""

    name: str
    padding_free: bool
    attention: str
    liger: bool
    gradient_checkpointing: bool
    grad_accum: int   # micro-batches per optimizer step; the examples per step are the same for every recipe
    exar_defaults: bool = False


RECIPES = {
    "plain": Recipe("plain", padding_free=False, attention="sdpa", liger=False, gradient_checkpointing=True,
                    grad_accum=4),
    "exar": Recipe("exar", padding_free=True, attention="flex_attention", liger=True, gradient_checkpointing=True,
                   grad_accum=1, exar_defaults=True),
    # levers, measured one at a time against exar's defaults
    "exar-2mb": Recipe("exar-2mb", padding_free=True, attention="flex_attention", liger=True,
                       gradient_checkpointing=True, grad_accum=2, exar_defaults=True),
    "exar-sdpa": Recipe("exar-sdpa", padding_free=True, attention="sdpa", liger=False, gradient_checkpointing=True,
                        grad_accum=1),
    "exar-no-liger": Recipe("exar-no-liger", padding_free=True, attention="flex_attention", liger=False,
                            gradient_checkpointing=True, grad_accum=1),
    "exar-no-gc": Recipe("exar-no-gc", padding_free=True, attention="flex_attention", liger=True,
                         gradient_checkpointing=False, grad_accum=1),
}


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


def random_llama_nf4(shape: dict, attention: str, seed: int, device: str):
    """A randomly initialised Llama built on ``device``, every decoder Linear replaced by NF4 (double quant)."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
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
    times.sort()
    return 2 * 8192**3 / times[len(times) // 2] / 1e12


class TokenCounter:
    """Counts the useful tokens and examples each forward pass sees (padding excluded)."""

    def __init__(self):
        self.tokens = 0
        self.examples = 0

    def __call__(self, module, args, kwargs):
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


def step_clock(counter: TokenCounter, device: str):
    import torch
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []  # (time, useful tokens, examples) after each optimizer step

        def on_train_begin(self, args, state, control, **kwargs):
            self._mark()

        def on_step_end(self, args, state, control, **kwargs):
            self._mark()

        def _mark(self):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), counter.tokens, counter.examples))

    return Clock()


def plain_trainer(model, tokenizer, rows, recipe: Recipe, batch: int, steps: int, seed: int, work: Path, device: str):
    """The seeds' recipe: peft's k-bit preparation, padded rows, SFTTrainer."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.gradient_checkpointing)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             task_type="CAUSAL_LM"))
    config = SFTConfig(
        output_dir=str(work), max_steps=steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=recipe.grad_accum, learning_rate=2e-4, lr_scheduler_type="constant",
        optim="paged_adamw_8bit" if device.startswith("cuda") else "adamw_torch",
        bf16=device.startswith("cuda"), gradient_checkpointing=recipe.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, max_length=MAX_TOKENS,
        pad_to_multiple_of=MAX_TOKENS, logging_steps=1, save_strategy="no", report_to="none", seed=seed,
        data_seed=seed, dataloader_num_workers=0, use_cpu=not device.startswith("cuda"),
    )
    return SFTTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=Dataset.from_list(rows))


def exar_plan(recipe: Recipe):
    """exar's device plan; a lever recipe changes one of its choices."""
    from exar.train.trainer import device_plan

    plan = device_plan(4)
    if recipe.exar_defaults:
        return plan
    return replace(plan, attention=recipe.attention, liger=recipe.liger, padding_free=recipe.padding_free)


def exar_trainer(model, tokenizer, rows, recipe: Recipe, plan, batch: int, steps: int, seed: int, work: Path):
    """exar's trainer: its model preparation and SFTTrainer set-up (exar.train.trainer)."""
    from exar.train.settings import TrainSettings
    from exar.train.trainer import build_trainer, prepare_model

    settings = TrainSettings(max_steps=steps, batch_size=batch, grad_accum=recipe.grad_accum,
                             lr=2e-4, warmup_ratio=0.0, scheduler="constant_with_warmup", eval_fraction=0.0,
                             save_steps=10_000, seed=seed, max_seq_len=MAX_TOKENS,
                             gradient_checkpointing=recipe.gradient_checkpointing)
    return build_trainer(prepare_model(model, settings, plan), tokenizer, rows, [], settings, plan, work)


def run_child(recipe: Recipe, shape: str, steps: int, warmup: int, seed: int, device: str, per_step: int) -> dict:
    """One recipe, timed after ``warmup`` optimizer steps; returns its figures.

    Under ``accelerate launch`` (DDP) each process takes ``per_step / processes`` examples a step,
    so the global batch, and with it the losses, match a one-GPU run.
    """
    import tempfile

    import torch
    from accelerate import PartialState

    state = PartialState()
    if device == "cuda":
        device = f"cuda:{state.local_process_index}"
        torch.cuda.set_device(device)
    world = state.num_processes
    batch = per_step // world // recipe.grad_accum
    tokenizer = _tokenizer(SHAPES[shape]["vocab_size"])
    rows = dolly_like_rows(per_step * (warmup + steps), SHAPES[shape]["vocab_size"], seed)
    plan = None if recipe.name == "plain" else exar_plan(recipe)
    model = random_llama_nf4(SHAPES[shape], plan.attention if plan else recipe.attention, seed, device)
    model.config.use_cache = False  # both recipes train without a KV cache (exar's load_model(for_training=True))
    counter = TokenCounter()
    with tempfile.TemporaryDirectory() as work:
        if plan is None:
            trainer = plain_trainer(model, tokenizer, rows, recipe, batch, warmup + steps, seed, Path(work), device)
        else:
            trainer = exar_trainer(model, tokenizer, rows, recipe, plan, batch, warmup + steps, seed, Path(work))
        trainer.model.register_forward_pre_hook(counter, with_kwargs=True)
        clock = step_clock(counter, device)
        trainer.add_callback(clock)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    marks = clock.marks
    (t0, n0, e0), (t1, n1, e1) = marks[warmup], marks[-1]
    step_times = sorted(b[0] - a[0] for a, b in zip(marks[warmup:], marks[warmup + 1:]))
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    seen = torch.tensor([n1 - n0, e1 - e0], dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(seen)  # tokens and examples of every process
    return {
        "recipe": recipe.name, **asdict(recipe), "per_device_batch": batch,
        **({"plan": plan.to_dict()} if plan else {}),
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "processes": world, "steps_timed": steps, "warmup_steps": warmup,
        "examples_per_step": float(seen[1]) / steps,
        "useful_tokens_per_s": float(seen[0]) / (t1 - t0),
        "step_s_median": step_times[len(step_times) // 2],
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else float("nan"),
        "first_losses": losses[:5],
        "warmup_s": marks[warmup][0] - marks[0][0],
    }


def _tokenizer(vocab: int):
    """A tokenizer object SFTTrainer needs for padding; rows come tokenized already."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    vocab_map = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab_map, unk_token="<unk>")),
                                        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    return tokenizer


def n_matmul_params(shape: dict) -> int:
    """Parameters that take part in matrix products (all but the embedding table)."""
    h, i, layers, vocab = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * vocab


def table(results: list[dict], tflops: float, shape: dict, baseline: str = "plain") -> str:
    """One row per run: ratios against the one-GPU ``baseline`` recipe, scaling against the same recipe on one GPU."""
    params = n_matmul_params(shape)
    one_gpu = {r["recipe"]: r for r in results if r["processes"] == 1}
    base = one_gpu.get(baseline)
    lines = [f"{'recipe':<14} {'GPUs':>4} {'useful tok/s':>12} {'step s':>7} {'peak GiB':>9} {'MFU/GPU':>7} "
             f"{'ex/step':>7} {'x ' + baseline:>9} {'mem x':>6} {'scaling':>7}  first losses"]
    for r in results:
        mfu = 6 * params * r["useful_tokens_per_s"] / r["processes"] / (tflops * 1e12)
        ratio = r["useful_tokens_per_s"] / base["useful_tokens_per_s"] if base else float("nan")
        mem = r["peak_gib"] / base["peak_gib"] if base else float("nan")
        single = one_gpu.get(r["recipe"])
        scaling = r["useful_tokens_per_s"] / single["useful_tokens_per_s"] if single else float("nan")
        losses = " ".join(f"{x:.4f}" for x in r["first_losses"][:4])
        lines.append(f"{r['recipe']:<14} {r['processes']:>4} {r['useful_tokens_per_s']:>12.0f} "
                     f"{r['step_s_median']:>7.3f} {r['peak_gib']:>9.2f} {mfu:>7.1%} {r['examples_per_step']:>7.1f} "
                     f"{ratio:>9.2f} {mem:>6.2f} {scaling:>7.2f}  {losses}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default="plain,exar", help=f"comma list of {', '.join(RECIPES)}")
    parser.add_argument("--shape", choices=SHAPES, default="llama2-7b")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per recipe")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first (compilation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples-per-step", type=int, default=EXAMPLES_PER_STEP,
                        help="global batch: examples per optimizer step, over all GPUs")
    parser.add_argument("--processes", default="1",
                        help="comma list of GPU counts; more than 1 runs under accelerate launch (DDP)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to check the script with --shape tiny")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    common = ["--shape", args.shape, "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--seed", str(args.seed), "--device", args.device, "--examples-per-step", str(args.examples_per_step)]
    if args.child:
        result = run_child(RECIPES[args.child], args.shape, args.steps, args.warmup, args.seed, args.device,
                           args.examples_per_step)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return 0

    runs = [(name, int(n)) for name in args.recipes.split(",") for n in args.processes.split(",")]
    results = []
    for name, processes in runs:
        started = time.perf_counter()
        env = dict(os.environ)
        if processes == 1:  # one visible GPU: with more, Trainer would fall back to DataParallel
            env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
            launch = [sys.executable]
        else:
            launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
        proc = subprocess.run([*launch, __file__, "--child", name, *common], capture_output=True, text=True, env=env)
        found = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not found:
            print(f"{name} x{processes}: failed (exit {proc.returncode})\n{proc.stderr[-6000:]}", file=sys.stderr)
            continue
        results.append(json.loads(found[-1]))
        print(f"{name} x{processes}: {time.perf_counter() - started:.0f} s; {json.dumps(results[-1])}", flush=True)
    tflops = matmul_tflops(args.device)
    report = {"date": time.strftime("%Y-%m-%d"), "shape": args.shape, "matmul_bf16_tflops": tflops,
              "matmul_params": n_matmul_params(SHAPES[args.shape]), "results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(f"\nQLoRA at {args.shape} shape, NF4, LoRA r=16 q/k/v/o, {args.examples_per_step} examples per optimizer step; "
          f"bf16 matmul measured at {tflops:.0f} TFLOP/s")
    print(table(results, tflops, SHAPES[args.shape]))
    return 0 if len(results) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
