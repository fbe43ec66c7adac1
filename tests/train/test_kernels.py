"""exar.train.kernels on the CPU: the fused QLoRA layer computes peft's function, forward and backward.

On a CPU the weight is decoded by bitsandbytes itself, so these check the autograd maths (LoRA
epilogue, dropout mask, skipped input gradients); tests/gpu/test_gpu_kernels.py checks the Triton
decode and the same maths in bf16 on CUDA.
"""

from __future__ import annotations

import pytest

from exar.train.settings import TrainSettings
from exar.train.trainer import device_plan, load_model, prepare_model
from test_train_fit import role_examples  # the rows of the CPU training tests


def _lora_model(folder, dropout: float):
    import torch

    settings = TrainSettings(max_steps=1, lora_dropout=dropout)
    plan = device_plan(4)
    model = prepare_model(load_model(folder, 4, plan, for_training=True), settings, plan)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a random B makes every gradient non-trivial
            torch.nn.init.normal_(param, std=0.05)
    return model.train()


def _loss_and_grads(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out.logits.detach(), grads


def test_patched_model_matches_peft_forward_and_backward(tiny_llama):
    """Same logits (fp32, within 1e-5 relative) and the same gradient for every LoRA weight (1e-4)."""
    import torch

    from exar.train.kernels import patch_qlora

    model = _lora_model(tiny_llama, dropout=0.0)
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_grads = _loss_and_grads(model, ids)
    patched = patch_qlora(model)
    assert patched == 2 * 7  # 2 layers x (q, k, v, o with LoRA + gate, up, down bare)
    logits, grads = _loss_and_grads(model, ids)
    assert float((logits - ref_logits).norm() / ref_logits.norm()) < 1e-5
    assert set(grads) == set(ref_grads) and len(grads) == 2 * 4 * 2
    for name, grad in grads.items():
        assert float((grad - ref_grads[name]).norm() / ref_grads[name].norm()) < 1e-4, name



@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_training_through_fused_layers_gives_peft_losses(tmp_path, tiny_llama, dropout):
    """Six steps of exar's trainer (gradient checkpointing on), fused layers forced on vs peft's, each model
    built after the same seed: the same losses within 1e-5 (fp32), dropout masks included."""
    from dataclasses import replace

    from transformers import set_seed

    from exar.basemodel import prompt_style
    from exar.train.examples import encode
    from exar.train.trainer import build_trainer, load_tokenizer


    tokenizer = load_tokenizer(tiny_llama)
    rows = [encode(tokenizer, e, 512) for e in role_examples("exar", prompt_style(tiny_llama))]
    settings = TrainSettings(max_steps=6, batch_size=4, grad_accum=1, lr=2e-4, warmup_ratio=0.0,
                             scheduler="constant_with_warmup", save_steps=1000, lora_dropout=dropout)
    plan = device_plan(4)
    losses = {}
    for name, kernels in (("kernels", True), ("peft", False)):
        set_seed(settings.seed)
        run_plan = replace(plan, kernels=kernels)
        model = prepare_model(load_model(tiny_llama, 4, run_plan, for_training=True), settings, run_plan)
        trainer = build_trainer(model, tokenizer, rows, [], settings, run_plan, tmp_path / name)
        trainer.train()
        losses[name] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses["kernels"]) == 6 and losses["kernels"][-1] < losses["kernels"][0]
    assert max(abs(a - b) for a, b in zip(losses["kernels"], losses["peft"])) < 1e-5

def test_fused_dropout_uses_one_mask_in_both_passes():
    """With dropout the LoRA path sees x * mask / (1 - p) and its gradient flows through the same mask."""
    import bitsandbytes as bnb
    import torch

    from exar.train.kernels import nf4_dequantize, qlora_linear

    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(64, 96, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(96, 64), requires_grad=False, compress_statistics=True,
                                    quant_type="nf4", module=base)._quantize("cpu")
    a = (torch.randn(8, 64) * 0.1).requires_grad_()
    b = (torch.randn(96, 8) * 0.1).requires_grad_()
    x = torch.randn(3, 5, 64, requires_grad=True)
    p, scaling = 0.3, 2.0

    torch.manual_seed(7)
    y = qlora_linear(x, base, a, b, scaling, p)
    y.square().sum().backward()
    fused = (y.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone())
    for t in (x, a, b):
        t.grad = None

    torch.manual_seed(7)
    _, mask = torch.native_dropout(x.detach().reshape(-1, 64), p, True)
    w = nf4_dequantize(base.weight)
    ref = x @ w.t() + scaling * ((x * mask.view_as(x) / (1 - p)) @ a.t()) @ b.t()
    ref.square().sum().backward()
    assert 0 < mask.float().mean() < 1
    for got, want in zip(fused, (ref.detach(), x.grad, a.grad, b.grad)):
        assert float((got - want).norm() / want.norm()) < 1e-5


def test_frozen_input_gets_no_gradient_work():
    """A frozen input (the embeddings feeding layer 0) asks for no input gradient: none is computed."""
    import bitsandbytes as bnb
    import torch

    from exar.train.kernels import qlora_linear

    base = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4",
                                    module=base)._quantize("cpu")
    a, b = torch.randn(4, 64, requires_grad=True), torch.randn(32, 4, requires_grad=True)
    x = torch.randn(6, 64)
    qlora_linear(x, base, a, b, 1.0, 0.0).sum().backward()
    assert x.grad is None and a.grad is not None and b.grad is not None


@pytest.mark.parametrize("layers, recompute", [(0, 2), (1, 1), (5, 0)])
def test_keep_activations_turns_checkpointing_off_from_the_last_layer(tiny_llama, layers, recompute):
    from exar.train.kernels import keep_activations

    model = _lora_model(tiny_llama, dropout=0.0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert keep_activations(model, layers) == recompute
    flags = [m.gradient_checkpointing for m in model.base_model.model.model.layers]
    assert flags == [True] * recompute + [False] * (2 - recompute)


def test_recompute_stops_before_the_last_product(tiny_llama, monkeypatch):
    """Under gradient checkpointing the backward recomputes a layer only up to its last saved tensor: the
    fused down_proj (no LoRA) saves none, so it is neither decoded nor multiplied again, one product in
    seven per layer (checkpoint's early stop; turned off, the recompute runs it)."""
    import torch
    import torch.utils.checkpoint

    import exar.train.kernels as kernels

    model = _lora_model(tiny_llama, dropout=0.0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kernels.patch_qlora(model)
    decodes = []
    real_decode = kernels._decode
    monkeypatch.setattr(kernels, "_decode", lambda *layout, **kw: decodes.append(layout[6:8]) or real_decode(*layout, **kw))
    ids = torch.randint(3, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    counts = {}
    for early_stop in (True, False):
        with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
            loss = model(input_ids=ids, labels=ids).loss
            forward = len(decodes)
            loss.backward()
        counts[early_stop] = (forward, len(decodes) - forward)
        decodes.clear()
        model.zero_grad()
    assert counts[True][0] == counts[False][0] == 2 * 7
    assert counts[False][1] - counts[True][1] == 2  # one down_proj per layer not recomputed


def test_compiled_layers_give_the_eager_loss_and_gradients(tiny_llama):
    """torch.compile'd decoder layers (fused NF4 layers inside, gradient checkpointing on around them):
    the eager loss (1e-5) and LoRA gradients (1e-4) for three row lengths, the third with no new
    compilation, the backward's recompute included, and no graph break (a break would split the layer
    and undo the fusion)."""
    import torch
    import torch._dynamo.utils as dynamo_utils

    from exar.train.kernels import compile_layers, decoder_layers, patch_qlora

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = _lora_model(tiny_llama, dropout=0.0)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        patch_qlora(model)
        models.append(model)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    assert compile_layers(models[1]) == 2
    assert not any(block.gradient_checkpointing for block in decoder_layers(models[1]))  # exar checkpoints them now
    for length in (24, 31, 40):
        ids = torch.randint(3, 1000, (1, length), generator=torch.Generator().manual_seed(length))
        (ref_logits, ref_grads), (logits, grads) = (_loss_and_grads(m, ids) for m in models)
        assert float((logits - ref_logits).norm() / ref_logits.norm()) < 1e-5
        assert set(grads) == set(ref_grads) and len(grads) == 2 * 4 * 2
        for name, grad in grads.items():
            assert float((grad - ref_grads[name]).norm() / ref_grads[name].norm()) < 1e-4, name
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 2  # static, then dynamic length
    assert not dynamo_utils.counters["graph_break"]


def test_compiled_layers_decode_again_instead_of_keeping_the_weight(tiny_llama, monkeypatch):
    """A compiled layer's backward decodes each NF4 weight again (one decode per fused layer, forward and
    backward alike) rather than keep the forward's decoded matrix: un-checkpointed, the compiled layers
    save no more bytes for the backward than the eager ones do (torch.compile merging the two decodes
    kept the matrix, a 7B layer's 0.4 GB, alive between the passes)."""
    import functools

    import torch
    import torch._dynamo.utils as dynamo_utils

    import exar.train.kernels as kernels

    ids = torch.randint(3, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    decodes = []
    real_decode = kernels._decode
    monkeypatch.setattr(kernels, "_decode", lambda *layout, **kw: decodes.append(1) or real_decode(*layout, **kw))
    figures = {}
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    for compiled in (False, True):
        torch.manual_seed(0)
        model = _lora_model(tiny_llama, dropout=0.0)
        kernels.patch_qlora(model)
        kernels.keep_activations(model, 2)
        if compiled:
            assert kernels.compile_layers(model) == 2
        decodes.clear()
        storages = {}
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(_note_storage, storages), lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        forward = len(decodes)
        loss.backward()
        figures[compiled] = (sum(storages.values()), forward, len(decodes) - forward)
    (eager_bytes, *eager_decodes), (compiled_bytes, *compiled_decodes) = figures[False], figures[True]
    assert compiled_decodes == eager_decodes == [2 * 7, 2 * 7]
    assert compiled_bytes <= eager_bytes
    assert not dynamo_utils.counters["graph_break"]


def _note_storage(storages: dict, tensor):
    """A saved-tensor hook: notes the bytes of each storage the backward keeps."""
    storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return tensor
