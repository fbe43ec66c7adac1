"""One training path for the three adapters: transformers + peft + bitsandbytes + trl SFTTrainer.

The roles differ only in their rows (exar.train.examples); everything here is shared. The same
code runs on a GPU (bf16 compute, paged 8-bit AdamW) and on a CPU (fp32 compute, plain AdamW;
bitsandbytes >= 0.48 quantizes NF4 and LLM.int8 on the CPU), and under ``accelerate launch``
(DDP: each process holds its own replica; only the main process writes the run).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from exar.data import append_jsonl, read_jsonl_resumable, write_jsonl
from exar.errors import ExarError
from exar.rundir import Run, atomic_write_json, one_writer
from exar.train.examples import Example, encode
from exar.train.settings import ALL_LINEAR, TrainSettings

CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
WORK_LOG = "train_log.jsonl"
CHECKPOINT_SETTINGS = "exar-settings.json"


@dataclass(frozen=True)
class DevicePlan:
    """What the hardware decided, recorded in run.json so a reader knows how an adapter was made."""

    device: str
    compute_dtype: str
    optimizer: str
    bf16: bool
    adapter_dtype: str
    attention: str = "sdpa"      # transformers attn_implementation while training
    padding_free: bool = False   # a micro-batch is one row; position ids restart at each example
    liger: bool = False          # liger-kernel's fused RMSNorm / SwiGLU / RoPE
    kernels: bool = False        # exar.train.kernels: fused NF4 decode + LoRA layers
    keep_layers: int = 0         # decoder layers trained without gradient checkpointing (from the last)
    compile: bool = False        # torch.compile each decoder layer (exar.train.kernels.compile_layers)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"device": self.device, "compute_dtype": self.compute_dtype, "optimizer": self.optimizer,
                "bf16": self.bf16, "adapter_dtype": self.adapter_dtype, "attention": self.attention,
                "padding_free": self.padding_free, "liger": self.liger, "kernels": self.kernels,
                "keep_layers": self.keep_layers, "compile": self.compile, "notes": list(self.notes)}


FLEX_MIN_HEAD_DIM = 16  # flex attention's Triton kernels need head_dim >= 16


def device_plan(bits: int, head_dim: int | None = None) -> DevicePlan:
    """GPU: bf16 compute, paged 8-bit AdamW for quantized bases, padding-free micro-batches whose
    examples stay apart (flex attention's document mask skips the blocks between them), and
    liger-kernel when installed, exar's fused NF4 + LoRA layers (exar.train.kernels) for 4-bit bases;
    CPU: fp32, plain AdamW, padded batches (flex attention needs Triton).

    The GPU choices were measured in bench/train_gpu.py (bench/RESULTS.md, "GPU training").
    """
    import importlib.util

    import torch

    if bits in (4, 8):
        require_bitsandbytes(bits)
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if bf16 else "float16"
        quantized = bits in (4, 8)
        flex = importlib.util.find_spec("triton") is not None and (head_dim or FLEX_MIN_HEAD_DIM) >= FLEX_MIN_HEAD_DIM
        liger = importlib.util.find_spec("liger_kernel") is not None
        kernels = bits == 4 and importlib.util.find_spec("triton") is not None
        return DevicePlan(
            device=f"cuda ({torch.cuda.get_device_name()})", compute_dtype=dtype,
            optimizer="paged_adamw_8bit" if quantized else "adamw_torch", bf16=bf16,
            adapter_dtype="bfloat16" if quantized and bf16 else "float32",
            attention="flex_attention" if flex else "sdpa", padding_free=True, liger=liger, kernels=kernels,
            notes=("GPU: paged 8-bit AdamW, LoRA weights in bf16 (QLoRA paper)" if quantized else "GPU: bf16 LoRA",
                   "GPU: padding-free batches, examples kept apart by "
                   + ("flex attention's document mask" if flex else "SDPA's block-diagonal mask")
                   + ("; liger-kernel RMSNorm/SwiGLU/RoPE" if liger else " (pip install liger-kernel: faster)")
                   + ("; exar's fused NF4 + LoRA layers" if kernels else "")),
        )
    return DevicePlan(
        device="cpu", compute_dtype="float32", optimizer="adamw_torch", bf16=False, adapter_dtype="float32",
        notes=("CPU: no bf16 compute, no paged 8-bit optimizer (both need a GPU); fp32 LoRA weights",),
    )


def with_compiled_layers(plan: DevicePlan) -> DevicePlan:
    """``plan`` with every decoder layer torch.compiled (``--compile``): inductor then fuses the norms,
    RoPE and SwiGLU that liger fused, so liger is off. Measured only around exar's fused NF4 layers (a
    4-bit base on a GPU), so only there: 1.16-1.38x trl's fastest setup at 7B shape (bench/RESULTS.md)."""
    if not plan.kernels:
        raise ExarError("--compile needs a CUDA GPU and --bits 4 (it compiles exar's fused NF4 layers); "
                        f"this run trains on {plan.device} without them: drop --compile")
    return replace(plan, compile=True, liger=False,
                   notes=(*plan.notes, "--compile: every decoder layer torch.compiled (inductor instead of liger)"))


def require_bitsandbytes(bits: int) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ExarError(f"--bits {bits} needs bitsandbytes, which is not installed: "
                        "pip install bitsandbytes, or train plain LoRA with --bits 16") from None


def quantization_config(bits: int, compute_dtype: str):
    """NF4 + double quantization for 4 bits (QLoRA), LLM.int8 for 8, none for 16."""
    import torch
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=getattr(torch, compute_dtype))
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(local_folder(folder)))
    if tokenizer.pad_token is None:  # Llama has none; padded positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(base_path: str | Path, bits: int, plan: DevicePlan, adapter: str | Path | None = None,
               for_training: bool = False):
    """The base (quantized as ``bits`` says) on this process's device, with ``adapter`` on top if given.

    ``for_training`` turns the KV cache off: with a cache transformers does not build the
    per-example attention mask from restarting position_ids, and packed rows would see each other.
    It also takes the plan's attention; inference (padded batches, generation) uses SDPA.
    """
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM

    device = PartialState().local_process_index if plan.device.startswith("cuda") else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        str(local_folder(base_path)), dtype=getattr(torch, plan.compute_dtype),
        attn_implementation=plan.attention if for_training else "sdpa",
        quantization_config=quantization_config(bits, plan.compute_dtype), device_map={"": device},
    )
    if bits == 4 and device == "cpu":
        keep_cpu_4bit_unpacked(model)
    if for_training:
        model.config.use_cache = False
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model


def load_for_inference(base_path: str | Path, bits: int, plan: DevicePlan, adapter: str | Path | None = None):
    """``load_model`` for generating and scoring only, in eval mode. On the 16-bit base the adapter is
    folded into the weights (``merge_and_unload``): one product per layer instead of peft's three, as
    the merged model that export writes runs. A 4- or 8-bit base keeps the adapter beside it."""
    model = load_model(base_path, bits, plan, adapter=adapter)
    if adapter is not None and bits == 16:
        model = model.merge_and_unload()
    return model.eval()


def local_folder(path: str | Path) -> Path:
    """A model folder that must exist here: transformers would take a missing path for a Hub name."""
    if not Path(path).is_dir():
        raise ExarError(f"{path}: model folder not found (the run records this base path; was the base moved?); "
                        "exar never downloads a base: put the folder back, or start a new run with --base")
    return Path(path)


CPU_4BIT_BLOCK_N = 32  # bitsandbytes' CPU NF4 inference kernel takes rows in blocks of 32


def keep_cpu_4bit_unpacked(model) -> int:
    """Let every 4-bit layer of a CPU model run inference, whatever its width; returns how many were kept.

    In eval mode on an AVX512-BF16 CPU, bitsandbytes repacks each NF4 weight for its fused
    kernel, which asserts unless out_features is a multiple of 32 and in_features of the quant
    block (stories260K's ffn width 172 fails both). Such layers stay in the plain NF4 layout,
    which bitsandbytes dequantizes per call, as it does in training: same numbers, a little slower.
    """
    import bitsandbytes as bnb

    kept = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            if module.out_features % CPU_4BIT_BLOCK_N or module.in_features % state.blocksize:
                module.support_avx512bf16_for_cpu = False
                kept += 1
    return kept


@dataclass
class Fitted:
    """A trained adapter still in memory (the validator scores its validation slice with it)."""

    model: object
    tokenizer: object
    summary: dict
    eval_examples: list[Example] = field(default_factory=list)


def fit_adapter(run: Run, role: str, train_examples: Sequence[Example], eval_examples: Sequence[Example],
                settings: TrainSettings, *, resume: bool = True, callbacks: Sequence = ()) -> Fitted:
    """Train one LoRA adapter and save it (with the tokenizer) as ``adapters/<role>/`` in the run.

    Checkpoints go to ``checkpoints/<role>/`` every ``save_steps``; with ``resume`` an interrupted
    run continues from the last complete one (refused if the settings changed). Per-step logs go
    to ``logs/<role>.train_log.jsonl`` (and TensorBoard when installed).
    """
    from transformers import set_seed

    # transformers 5 renamed gradient_checkpointing; trl and peft still use the old name
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    base_path = run.settings["base"]["path"]
    plan = device_plan(settings.bits, head_dim(base_path))
    if settings.compile:
        plan = with_compiled_layers(plan)
    tokenizer = load_tokenizer(base_path)
    train_rows, dropped = _encode_all(tokenizer, train_examples, settings.max_seq_len)
    eval_rows, eval_dropped = _encode_all(tokenizer, eval_examples, settings.max_seq_len)
    if not train_rows:
        raise ExarError(f"{role}: no training rows fit in --max-seq-len {settings.max_seq_len} "
                        f"({dropped} prompts too long)")

    work = run.path(f"{CHECKPOINTS_DIR}/{role}")
    data_fingerprint = _fingerprint([run.settings["base"].get("fingerprint"), train_rows, eval_rows])
    resume_from = one_writer(_prepare_checkpoints)(work, settings, resume, data_fingerprint)
    set_seed(settings.seed)
    model = prepare_model(load_model(base_path, settings.bits, plan, for_training=True), settings, plan)
    trainer = build_trainer(model, tokenizer, train_rows, eval_rows, settings, plan, work, callbacks)
    log_path = work / WORK_LOG

    print(f"{role}: {len(train_rows)} training rows, {len(eval_rows)} validation rows, "
          f"{settings.bits}-bit base on {plan.device} ({plan.compute_dtype}); {'; '.join(plan.notes)}", file=sys.stderr)
    if resume_from:
        print(f"{role}: resuming from {resume_from}", file=sys.stderr)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume_from)
    eval_loss = trainer.evaluate()["eval_loss"] if eval_rows else None
    seconds = time.perf_counter() - started

    log_rows = read_jsonl_resumable(log_path)
    losses = [r["loss"] for r in log_rows if "loss" in r]
    summary = {
        **settings.to_dict(),
        **plan.to_dict(),
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "dropped_too_long": dropped + eval_dropped,
        "steps": output.global_step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "eval_loss": eval_loss,
        "train_seconds": round(seconds, 2),
        "resumed_from": Path(resume_from).name if resume_from else None,
        "tensorboard": _has_tensorboard(),
    }
    if trainer.is_world_process_zero():
        _save(run, role, trainer.model, tokenizer, log_path)
    trainer.accelerator.wait_for_everyone()
    if plan.attention != "sdpa":  # the validator's scoring after training sees padded batches
        trainer.model.get_base_model().set_attn_implementation("sdpa")
    return Fitted(trainer.model, tokenizer, summary, list(eval_examples))


def head_dim(base_path: str | Path) -> int:
    from exar.basemodel import read_config

    config = read_config(Path(base_path))
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def prepare_model(model, settings: TrainSettings, plan: DevicePlan):
    """The frozen base with fresh LoRA weights on top.

    peft's k-bit preparation copies the unquantized weights (embeddings, LM head, norms) to fp32,
    which fp16 and fp32 compute keep; with bf16 compute exar leaves them bf16, as measured in
    bench/train_gpu.py: 2.3 GiB less peak memory at Llama-2-7B shape, and faster.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if settings.bits in (4, 8) and plan.compute_dtype == "bfloat16":
        model.requires_grad_(False)  # gradient checkpointing is non-reentrant: no input-grad hook needed
    elif settings.bits in (4, 8):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    lora = LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules if settings.target_modules == ALL_LINEAR else list(settings.target_modules),
        bias="none", task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def build_trainer(model, tokenizer, train_rows: Sequence[dict], eval_rows: Sequence[dict], settings: TrainSettings,
                  plan: DevicePlan, work: Path, callbacks: Sequence = ()):
    """trl's SFTTrainer over tokenized rows (``encode``), as ``settings`` and the device ``plan`` say.

    With packing, rows are packed best-fit-decreasing into ``max_seq_len`` with restarting
    position_ids (padding-free batches); the model must have its KV cache off (``load_model``'s
    ``for_training``) for transformers to keep each example's attention to itself. A padding-free
    plan (GPU) makes each micro-batch of ``batch_size`` rows one such row without packing: no
    compute goes to padding, and the rows are already cut to ``max_seq_len`` by ``encode``.
    """
    import datasets
    from datasets import Dataset
    from transformers.trainer_callback import ProgressCallback
    from trl import SFTConfig, SFTTrainer

    warnings.filterwarnings("ignore", message=".*use_liger_kernel.*deprecated", category=FutureWarning)
    config = SFTConfig(
        output_dir=str(work),
        max_steps=settings.max_steps if settings.max_steps > 0 else -1,
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr,
        warmup_steps=settings.warmup_ratio,
        lr_scheduler_type=settings.scheduler,
        optim=plan.optimizer,
        bf16=plan.bf16,
        gradient_checkpointing=settings.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=None if plan.padding_free and not settings.packing else settings.max_seq_len,
        packing=settings.packing,
        packing_strategy="bfd",
        padding_free=plan.padding_free,
        use_liger_kernel=plan.liger,
        ddp_find_unused_parameters=False,  # every LoRA weight is used; DDP warned of an extra graph walk a step
        logging_steps=1,
        disable_tqdm=False,  # transformers ties it to its log level, which exar keeps at error
        save_strategy="steps",
        save_steps=settings.save_steps,
        eval_strategy="steps" if eval_rows else "no",
        eval_steps=settings.save_steps,
        seed=settings.seed,
        data_seed=settings.seed,
        report_to=["tensorboard"] if _has_tensorboard() else "none",
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        remove_unused_columns=True,
        use_cpu=not plan.device.startswith("cuda"),
    )
    score_label_positions_only()
    datasets.disable_progress_bars()  # trl's dataset passes are instant here; keep stderr for the step bar
    try:
        trainer = SFTTrainer(
            model=model, args=config, processing_class=tokenizer,
            train_dataset=Dataset.from_list(list(train_rows)),
            eval_dataset=Dataset.from_list(list(eval_rows)) if eval_rows else None,
            callbacks=[jsonl_log_callback(work / WORK_LOG), *callbacks],
        )
    finally:
        datasets.enable_progress_bars()
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(loss_bar_callback())
    if plan.adapter_dtype == "float32":
        _keep_adapter_fp32(trainer.model)
    if plan.kernels or plan.keep_layers or plan.compile:
        from exar.train.kernels import apply_plan

        apply_plan(trainer, plan)
    return trainer


def score_label_positions_only() -> None:
    """Let trl's fused LM head score only the positions that carry a label on the CPU too.

    trl (1.x) projects just the completion's positions through the LM head on Triton devices, but every
    position elsewhere (a fixed tile shape spares Neuron's compiler a recompile per batch). On a CPU that
    is a vocabulary-wide log-softmax over every prompt token for nothing: with completion-only loss the
    prompt is most of a row: scoring only the labelled positions makes the demo's steps 1.62x faster
    with the same losses (bench/RESULTS.md, "CPU training"). A trl that moved this switch is left as it
    is (tests/train/test_train_fit.py notices).
    """
    import trl.trainer.utils as trl_utils

    try:
        from trl.kernels import chunked_logprob
    except ImportError:  # a trl without the fused head
        return
    device_check = getattr(trl_utils, "_use_triton", None)
    if device_check is not chunked_logprob._use_triton:  # already done, or trl changed
        return

    def compact(device) -> bool:
        return device.type == "cpu" or device_check(device)

    trl_utils._use_triton = compact


def _save(run: Run, role: str, model, tokenizer, log_path: Path) -> None:
    from exar.constants import ADAPTERS_DIR, DATASET_PLUS, DEV_SPLIT, TRAIN_SPLIT

    made_from = [TRAIN_SPLIT, DEV_SPLIT] if role == "answer" else [DATASET_PLUS]
    with run.writing(f"{ADAPTERS_DIR}/{role}", "adapter", role=role, made_from=made_from, is_dir=True) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    with run.writing(f"{LOGS_DIR}/{role}.train_log.jsonl", "train-log", role=role) as tmp:
        write_jsonl(tmp, _one_row_per_step(read_jsonl_resumable(log_path)))
    shutil.rmtree(log_path.parent, ignore_errors=True)


def _one_row_per_step(rows: list[dict]) -> list[dict]:
    """The first loss row and the first validation row of each step: the final evaluation repeats the
    last step's, and a run resumed after it (killed before saving) would repeat it once more."""
    seen, kept = set(), []
    for row in rows:
        key = (row.get("step"), "loss" in row)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def _encode_all(tokenizer, examples: Sequence[Example], max_seq_len: int) -> tuple[list[dict], int]:
    rows = [encode(tokenizer, e, max_seq_len) for e in examples]
    kept = [r for r in rows if r is not None]
    return kept, len(rows) - len(kept)


def _fingerprint(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _prepare_checkpoints(work: Path, settings: TrainSettings, resume: bool, data_fingerprint: str) -> str | None:
    """The checkpoint to resume from, or None after clearing ``work`` for a fresh start.

    A checkpoint is resumed only if it was made with the same settings and the same data (the
    base and the tokenized training and validation rows): anything else would mix two trainings.
    """
    fingerprint = _fingerprint(settings.identity())
    recorded = work / CHECKPOINT_SETTINGS
    last = last_checkpoint(work)
    if resume and last is not None:
        made = json.loads(recorded.read_text()) if recorded.is_file() else {}
        if made.get("fingerprint") != fingerprint:
            raise ExarError(f"{work}: the checkpoints were made with other training settings; "
                            "rerun with the same options, or with --no-resume to start over")
        if made.get("data") != data_fingerprint:
            raise ExarError(f"{work}: the checkpoints were made from other training data (the rows or the base "
                            "changed since); rerun with --no-resume to start over")
        step = int(last.name.split("-")[1])
        log = work / WORK_LOG  # drop log rows from steps the checkpoint does not hold
        rows = [r for r in read_jsonl_resumable(log) if r.get("step", 0) <= step]
        write_jsonl(log, rows)
        return str(last)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    atomic_write_json(recorded, {"fingerprint": fingerprint, "data": data_fingerprint, "settings": settings.to_dict()})
    return None


def last_checkpoint(work: Path) -> Path | None:
    """The newest ``checkpoint-N`` whose trainer state was written (the Trainer writes it last)."""
    if not work.is_dir():
        return None
    done = [p for p in work.glob("checkpoint-*") if (p / "trainer_state.json").is_file()
            and p.name.split("-")[1].isdigit()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _keep_adapter_fp32(model) -> None:
    """trl casts QLoRA adapter weights to bf16 (right on a GPU); with fp32 CPU compute keep them fp32."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _peak_memory_mb() -> tuple[float, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_allocated"
    from exar.resources import peak_rss_mb

    return peak_rss_mb(), "process_rss"


def loss_bar_callback():
    """transformers' step bar, showing the loss instead of printing every log dict under it."""
    from transformers.trainer_callback import ProgressCallback

    class LossBar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    return LossBar()


def jsonl_log_callback(path: Path):
    """A TrainerCallback writing one JSON line per logged step: loss, lr, grad norm, tokens/s, memory."""
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def __init__(self):
            self.last = None  # (time, tokens seen) at the previous logged step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
            if "loss" in logs:
                now, tokens = time.perf_counter(), state.num_input_tokens_seen
                speed = (tokens - self.last[1]) / (now - self.last[0]) if self.last and now > self.last[0] else None
                self.last = (now, tokens)
                memory, kind = _peak_memory_mb()
                row.update(loss=logs["loss"], lr=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                           tokens_seen=tokens, tokens_per_s=round(speed, 1) if speed else None,
                           peak_memory_mb=round(memory, 1), memory=kind)
            elif "eval_loss" in logs:
                row["eval_loss"] = logs["eval_loss"]
            else:
                return
            append_jsonl(path, row)

    return JsonlLog()
