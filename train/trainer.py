"""One training path for the three adapters: transformers + peft + bitsandbytes + trl SFTTrainer.

The roles differ only in their rows (exar.train.examples); everything here is shared. The same
code runs on a GPU (bf16 compute, paged 8-bit AdamW) and on a CPU (fp32 compute, plain AdamW;
bitsandbytes >= 0.48 quantizes NF4 and LLM.int8 on the CPU), and under ``accelerate launch``
(DDP: each process holds its own replica; only the main process writes the run).
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from exar.data import append_jsonl, read_jsonl_resumable, split_qa, write_jsonl
from exar.errors import ExarError
from exar.rundir import Run, atomic_write_json
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
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"device": self.device, "compute_dtype": self.compute_dtype, "optimizer": self.optimizer,
                "bf16": self.bf16, "adapter_dtype": self.adapter_dtype, "notes": list(self.notes)}


def device_plan(bits: int) -> DevicePlan:
    """GPU: bf16 compute, paged 8-bit AdamW for quantized bases; CPU: fp32 and plain AdamW."""
    import torch

    if bits in (4, 8):
        require_bitsandbytes(bits)
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if bf16 else "float16"
        quantized = bits in (4, 8)
        return DevicePlan(
            device=f"cuda ({torch.cuda.get_device_name()})", compute_dtype=dtype,
            optimizer="paged_adamw_8bit" if quantized else "adamw_torch", bf16=bf16,
            adapter_dtype="bfloat16" if quantized and bf16 else "float32",
            notes=("GPU: paged 8-bit AdamW, LoRA weights in bf16 (QLoRA paper)" if quantized else "GPU: bf16 LoRA",),
        )
    return DevicePlan(
        device="cpu", compute_dtype="float32", optimizer="adamw_torch", bf16=False, adapter_dtype="float32",
        notes=("CPU: no bf16 compute, no paged 8-bit optimizer (both need a GPU); fp32 LoRA weights",),
    )


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

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:  # Llama has none; padded positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(base_path: str | Path, bits: int, plan: DevicePlan, adapter: str | Path | None = None,
               trainable: bool = False):
    """The base (quantized as ``bits`` says) on this process's device, with ``adapter`` on top if given."""
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM

    device = PartialState().local_process_index if plan.device.startswith("cuda") else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        str(base_path), dtype=getattr(torch, plan.compute_dtype),
        quantization_config=quantization_config(bits, plan.compute_dtype), device_map={"": device},
    )
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    return model


@dataclass
class Fitted:
    """A trained adapter still in memory (the validator scores its validation slice with it)."""

    model: object
    tokenizer: object
    summary: dict
    eval_examples: list[Example] = field(default_factory=list)


def split_for_eval(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation) carved by question from the role's TRAIN rows; the test split is elsewhere."""
    if fraction <= 0 or len(examples) < 2:
        return list(examples), []
    train, held = split_qa(examples, test_fraction=fraction, seed=seed, question=lambda e: e.question)
    return (train, held) if train else (list(examples), [])


def fit_adapter(run: Run, role: str, train_examples: Sequence[Example], eval_examples: Sequence[Example],
                settings: TrainSettings, *, resume: bool = True, callbacks: Sequence = ()) -> Fitted:
    """Train one LoRA adapter and save it (with the tokenizer) as ``adapters/<role>/`` in the run.

    Checkpoints go to ``checkpoints/<role>/`` every ``save_steps``; with ``resume`` an interrupted
    run continues from the last complete one (refused if the settings changed). Per-step logs go
    to ``logs/<role>.train_log.jsonl`` (and TensorBoard when installed).
    """
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    base_path = run.settings["base"]["path"]
    plan = device_plan(settings.bits)
    tokenizer = load_tokenizer(base_path)
    train_rows, dropped = _encode_all(tokenizer, train_examples, settings.max_seq_len)
    eval_rows, eval_dropped = _encode_all(tokenizer, eval_examples, settings.max_seq_len)
    if not train_rows:
        raise ExarError(f"{role}: no training rows fit in --max-seq-len {settings.max_seq_len} "
                        f"({dropped} prompts too long)")

    work = run.path(f"{CHECKPOINTS_DIR}/{role}")
    resume_from = _prepare_checkpoints(work, settings, resume)
    set_seed(settings.seed)
    model = load_model(base_path, settings.bits, plan)
    if settings.bits in (4, 8):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    lora = LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules if settings.target_modules == ALL_LINEAR else list(settings.target_modules),
        bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)

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
        max_length=settings.max_seq_len,
        packing=settings.packing,
        packing_strategy="bfd",  # packed rows restart position_ids; attention stays inside each example
        logging_steps=1,
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
    log_path = work / WORK_LOG
    trainer = SFTTrainer(
        model=model, args=config, processing_class=tokenizer,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        callbacks=[jsonl_log_callback(log_path), *callbacks],
    )
    if plan.adapter_dtype == "float32":
        _keep_adapter_fp32(trainer.model)

    print(f"{role}: {len(train_rows)} training rows, {len(eval_rows)} validation rows, "
          f"{settings.bits}-bit base on {plan.device} ({plan.compute_dtype}); {plan.notes[0]}", file=sys.stderr)
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
    return Fitted(trainer.model, tokenizer, summary, list(eval_examples))


def _save(run: Run, role: str, model, tokenizer, log_path: Path) -> None:
    from exar.constants import ADAPTERS_DIR, TRAIN_SPLIT

    made_from = [p for p in (TRAIN_SPLIT, "data/dataset-plus.jsonl") if run.entry(p)]
    with run.writing(f"{ADAPTERS_DIR}/{role}", "adapter", role=role, made_from=made_from, is_dir=True) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    with run.writing(f"{LOGS_DIR}/{role}.train_log.jsonl", "train-log", role=role) as tmp:
        shutil.copyfile(log_path, tmp)
    shutil.rmtree(log_path.parent, ignore_errors=True)


def _encode_all(tokenizer, examples: Sequence[Example], max_seq_len: int) -> tuple[list[dict], int]:
    rows = [encode(tokenizer, e, max_seq_len) for e in examples]
    kept = [r for r in rows if r is not None]
    return kept, len(rows) - len(kept)


def _prepare_checkpoints(work: Path, settings: TrainSettings, resume: bool) -> str | None:
    """The checkpoint to resume from, or None after clearing ``work`` for a fresh start."""
    fingerprint = hashlib.sha256(json.dumps(settings.to_dict(), sort_keys=True).encode()).hexdigest()
    recorded = work / CHECKPOINT_SETTINGS
    last = last_checkpoint(work)
    if resume and last is not None:
        if json.loads(recorded.read_text()).get("fingerprint") != fingerprint:
            raise ExarError(f"{work}: the checkpoints were made with other training settings; "
                            "rerun with the same options, or with --no-resume to start over")
        step = int(last.name.split("-")[1])
        log = work / WORK_LOG  # drop log rows from steps the checkpoint does not hold
        rows = [r for r in read_jsonl_resumable(log) if r.get("step", 0) <= step]
        write_jsonl(log, rows)
        return str(last)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    atomic_write_json(recorded, {"fingerprint": fingerprint, "settings": settings.to_dict()})
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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_rss"


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
