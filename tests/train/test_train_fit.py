"""The one training path on the tiny Llama, 4-bit NF4 on the CPU: overfitting, save/reload, resume, packing."""

from __future__ import annotations

import json

import pytest

from exar.basemodel import prompt_style, resolve_base
from exar.data import QA
from exar.prompts import CORRECT, WRONG
from exar.rundir import Run
from exar.train.examples import answer_examples, balance, encode, exar_examples, validator_examples
from exar.train.settings import TrainSettings
from exar.train.trainer import device_plan, fit_adapter, load_model, load_tokenizer

QUESTIONS = [QA("What is the capital of France?", "Paris"), QA("Who wrote the book?", "The first author"),
             QA("Which planet is red?", "Mars"), QA("What is the symbol of gold?", "Au")]
ROWS = [
    {"question": "What is the capital of France?", "reference": "Paris", "prediction": "Lyon", "label": WRONG},
    {"question": "What is the capital of France?", "reference": "Paris", "prediction": "Paris", "label": CORRECT},
    {"question": "Which planet is red?", "reference": "Mars", "prediction": "Venus", "label": WRONG},
    {"question": "Which planet is red?", "reference": "Mars", "prediction": "Mars", "label": CORRECT},
]
# Overfit settings: all rows in one batch, a constant learning rate, no validation slice.
OVERFIT = TrainSettings(max_steps=20, batch_size=4, grad_accum=1, lr=1e-2, warmup_ratio=0.0,
                        scheduler="constant_with_warmup", save_steps=1000)


def make_run(root, base_folder) -> Run:
    run = Run.create(root)
    base = resolve_base(base_folder)
    run.bind_base(base.to_dict())
    run.update_settings("prompt", prompt_style(base.path).to_dict())
    return run


def role_examples(role: str, style):
    if role == "answer":
        return answer_examples(QUESTIONS, style)
    if role == "validator":
        return balance(validator_examples(ROWS, style), seed=0)
    return exar_examples(ROWS, style)


def losses(run: Run, role: str) -> list[float]:
    log = run.path(f"logs/{role}.train_log.jsonl").read_text().splitlines()
    return [row["loss"] for row in map(json.loads, log) if "loss" in row]


@pytest.mark.slow
@pytest.mark.parametrize("role, first_loss", [("answer", 7.2095), ("validator", 6.9937), ("exar", 7.0603)])
def test_each_role_overfits_in_4bit_and_reloads_identically(tmp_path, tiny_llama, role, first_loss):
    import torch

    run = make_run(tmp_path / "run", tiny_llama)
    style = prompt_style(tiny_llama)
    fitted = fit_adapter(run, role, role_examples(role, style), [], OVERFIT)
    logged = losses(run, role)
    assert len(logged) == 20
    assert logged[0] == pytest.approx(first_loss, abs=2e-3)       # fixed seed, fixed tiny model
    assert logged[-1] < logged[0] / 2                              # falls by more than a factor of 2
    assert fitted.summary["device"] == "cpu" and fitted.summary["bits"] == 4
    assert fitted.summary["compute_dtype"] == "float32" and fitted.summary["optimizer"] == "adamw_torch"

    # the saved adapter (with its tokenizer) reloads onto the NF4 base with the same logits
    adapter = run.path(f"adapters/{role}")
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "tokenizer_config.json").is_file()
    assert run.entry(f"adapters/{role}")["kind"] == "adapter"
    assert run.entry(f"logs/{role}.train_log.jsonl")["kind"] == "train-log"
    reloaded = load_model(tiny_llama, 4, device_plan(4), adapter=adapter)
    tokenizer = load_tokenizer(adapter)
    ids = tokenizer(role_examples(role, style)[0].prompt, return_tensors="pt")
    fitted.model.eval()
    reloaded.eval()
    with torch.no_grad():
        expected, got = fitted.model(**ids).logits, reloaded(**ids).logits
    assert torch.allclose(expected, got, atol=1e-5, rtol=0)
    assert not torch.allclose(got, load_model(tiny_llama, 4, device_plan(4))(**ids).logits, atol=1e-2)


class _Interrupt(Exception):
    pass


def _interrupt_after(step: int):
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise _Interrupt(f"interrupted after step {step}")

    return Stop()


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_adapter(tmp_path, tiny_llama):
    """Stop after step 5 (checkpoint at 4), resume: same adapter as 8 straight steps (dropout on)."""
    from safetensors.torch import load_file

    settings = TrainSettings(max_steps=8, batch_size=2, grad_accum=1, lr=5e-3, save_steps=4)
    style = prompt_style(tiny_llama)
    examples = answer_examples(QUESTIONS, style)

    straight = make_run(tmp_path / "straight", tiny_llama)
    fit_adapter(straight, "answer", examples, [], settings)

    resumed = make_run(tmp_path / "resumed", tiny_llama)
    with pytest.raises(_Interrupt):
        fit_adapter(resumed, "answer", examples, [], settings, callbacks=[_interrupt_after(5)])
    assert not resumed.path("adapters/answer").exists()             # nothing half-written
    assert (resumed.path("checkpoints/answer") / "checkpoint-4").is_dir()
    with pytest.raises(Exception, match="other training settings"):
        fit_adapter(resumed, "answer", examples, [], settings.with_(lr=1e-3))
    assert settings.with_(compile=True).identity() == settings.identity()  # speed only: it may change on resume
    with pytest.raises(Exception, match="made from other training data"):  # resume fingerprints the rows too
        fit_adapter(resumed, "answer", examples[:-1], [], settings)
    fitted = fit_adapter(resumed, "answer", examples, [], settings)
    assert fitted.summary["resumed_from"] == "checkpoint-4"
    assert fitted.summary["steps"] == 8

    a = load_file(straight.path("adapters/answer/adapter_model.safetensors"))
    b = load_file(resumed.path("adapters/answer/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-6, name
    assert losses(resumed, "answer") == pytest.approx(losses(straight, "answer"), abs=1e-6)
    assert [json.loads(r)["step"] for r in resumed.path("logs/answer.train_log.jsonl").read_text().splitlines()] \
        == list(range(1, 9))


def test_packed_examples_do_not_attend_to_each_other(tiny_llama):
    """trl's padding-free batch (one row, restarting position_ids): each example's loss equals its own."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer = load_tokenizer(tiny_llama)
    model = load_model(tiny_llama, 16, device_plan(16), for_training=True).eval()  # as fit_adapter loads it
    rows = [encode(tokenizer, e, 512) for e in answer_examples(QUESTIONS[:3], prompt_style(tiny_llama))]

    def per_token_loss(batch):
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch).logits[0, :-1]
        return torch.nn.functional.cross_entropy(logits, labels[0, 1:], reduction="none", ignore_index=-100)

    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(rows)
    assert "attention_mask" not in packed and packed["position_ids"][0, 0] == 0
    packed_loss = per_token_loss({k: packed[k] for k in ("input_ids", "position_ids", "labels")})
    alone = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    offset = 0
    for row in rows:
        single = alone([row])
        single_loss = per_token_loss({k: single[k] for k in ("input_ids", "attention_mask", "labels")})
        n = len(row["input_ids"])
        # position j predicts token j+1; the packed row's boundary positions predict the next example
        assert torch.allclose(packed_loss[offset:offset + n - 1], single_loss, atol=1e-5)
        offset += n
    # control: with the KV cache on (the inference default), transformers skips the per-example mask
    # and the second example attends to the first; load_model(for_training=True) turns the cache off
    model.config.use_cache = True
    leaked = per_token_loss({k: packed[k] for k in ("input_ids", "position_ids", "labels")})
    first, second = len(rows[0]["input_ids"]), len(rows[1]["input_ids"])
    assert not torch.allclose(leaked[first:first + second - 1], packed_loss[first:first + second - 1], atol=1e-2)


@pytest.mark.slow
def test_packing_trains_through_sft_trainer(tmp_path, tiny_llama):
    """--packing runs the same path (bfd packing, padding-free batches) and learns."""
    run = make_run(tmp_path / "run", tiny_llama)
    fitted = fit_adapter(run, "answer", answer_examples(QUESTIONS, prompt_style(tiny_llama)), [],
                         OVERFIT.with_(packing=True, max_steps=10, max_seq_len=128))
    logged = losses(run, "answer")
    assert fitted.summary["packing"] is True and len(logged) == 10
    assert logged[-1] < logged[0] * 0.75


def test_inference_folds_the_adapter_into_the_16bit_base(tmp_path, tiny_llama):
    """predict and calibration run a 16-bit role merged: no LoRA layer left, the unmerged model's logits
    (fp32, 1e-5 relative); a 4-bit base keeps the adapter beside it."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from exar.train.trainer import load_for_inference

    torch.manual_seed(0)
    lora = get_peft_model(load_model(tiny_llama, 16, device_plan(16)), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = load_model(tiny_llama, 16, device_plan(16), adapter=tmp_path / "adapter").eval()
        merged = load_for_inference(tiny_llama, 16, device_plan(16), adapter=tmp_path / "adapter")
        bare = load_model(tiny_llama, 16, device_plan(16)).eval()
        reference, logits, base_logits = (m(input_ids=ids).logits for m in (unmerged, merged, bare))
    assert not isinstance(merged, PeftModel) and not any("lora" in name for name, _ in merged.named_modules())
    assert float((logits - reference).norm() / reference.norm()) < 1e-5
    assert float((base_logits - reference).norm() / reference.norm()) > 1e-3  # the adapter does change them
    assert isinstance(load_for_inference(tiny_llama, 4, device_plan(4), adapter=tmp_path / "adapter"), PeftModel)


def test_cpu_training_scores_only_the_labelled_positions(tmp_path, tiny_llama, monkeypatch):
    """On the CPU trl's fused LM head gets only the positions that carry a label (the completion's
    tokens, one epoch of rows: exactly their label count), and the losses equal trl's own
    every-position scoring within 1e-6."""
    import trl.trainer.utils as trl_utils
    from trl.kernels import chunked_logprob

    import exar.train.trainer as trainer_module

    style = prompt_style(tiny_llama)
    examples = role_examples("validator", style)
    tokenizer = load_tokenizer(tiny_llama)
    label_tokens = sum(sum(t != -100 for t in encode(tokenizer, e, 512)["labels"]) for e in examples)
    settings = OVERFIT.with_(max_steps=2, batch_size=len(examples) // 2)
    scored = []
    real_apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                        lambda hidden, *args: scored.append(hidden.shape[0]) or real_apply(hidden, *args))

    compact = make_run(tmp_path / "compact", tiny_llama)
    fit_adapter(compact, "validator", examples, [], settings)
    assert sum(scored) == label_tokens and label_tokens < 0.5 * sum(len(encode(tokenizer, e, 512)["input_ids"])
                                                                     for e in examples)
    monkeypatch.setattr(trl_utils, "_use_triton", chunked_logprob._use_triton)  # trl as it comes
    monkeypatch.setattr(trainer_module, "score_label_positions_only", lambda: None)
    scored.clear()
    every = make_run(tmp_path / "every", tiny_llama)
    fit_adapter(every, "validator", examples, [], settings)
    assert sum(scored) > 2 * label_tokens
    assert losses(compact, "validator") == pytest.approx(losses(every, "validator"), abs=1e-6)
