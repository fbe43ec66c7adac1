"""Faster QLoRA layers for exar's GPU training path; bench/train_gpu.py measures each against trl + peft.

peft's LoRA on a bitsandbytes NF4 layer runs, per call: three launches to decode the weight
(double-quantized absmax, offset, NF4), the base matmul, a defensive copy of the output, dropout,
two LoRA matmuls, a scaling and an add, each through Python. ``patch_qlora`` replaces the forward
of every such layer with one autograd function:

- the weight is decoded by one Triton kernel (``nf4_dequantize``; bitsandbytes' own code on a CPU);
- the LoRA update is added inside the second matmul's epilogue (``addmm_`` into the base output):
  no copy, no separate scale and add;
- dropout's mask comes from the same fused kernel as ``nn.Dropout`` (same random stream);
- the backward decodes the weight again (nothing bf16 is kept), and skips the input gradient
  when nothing upstream needs it (the first layer's input is frozen embeddings).

The frozen NF4 layers without LoRA (the MLP) get the same decode and a plain matmul. The maths is
peft's: tests/gpu/test_gpu_kernels.py checks outputs and gradients against peft within bf16 rounding.
"""

from __future__ import annotations

import functools
import types

NESTED_BLOCK = 256  # bitsandbytes' double quantization: one fp32 scale per 256 absmax bytes


@functools.cache
def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_dequant(packed, absmax, code2, absmax2, nf4, out, offset, n_bytes,
                    NESTED: tl.constexpr, BYTES_PER_BLOCK: tl.constexpr, BLOCKS_PER_SCALE: tl.constexpr,
                    TILE: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * TILE
        offs = start + tl.arange(0, TILE)
        inside = offs < n_bytes
        byte = tl.load(packed + offs, mask=inside, other=0).to(tl.int32)
        block = offs // BYTES_PER_BLOCK
        if NESTED:
            q = tl.load(absmax + block, mask=inside, other=0).to(tl.int32)
            scale = tl.load(code2 + q, mask=inside, other=0.0) * tl.load(absmax2 + block // BLOCKS_PER_SCALE,
                                                                          mask=inside, other=0.0)
            scale = scale + offset
        else:
            scale = tl.load(absmax + block, mask=inside, other=0.0)
        high = tl.load(nf4 + (byte >> 4)) * scale   # bitsandbytes packs the first value in the high nibble
        low = tl.load(nf4 + (byte & 15)) * scale
        values = tl.interleave(high, low)
        outs = 2 * start + tl.arange(0, 2 * TILE)
        tl.store(out + outs, values.to(out.dtype.element_ty), mask=outs < 2 * n_bytes)

    return nf4_dequant


def triton_available(device) -> bool:
    import importlib.util

    return getattr(device, "type", str(device)) == "cuda" and importlib.util.find_spec("triton") is not None


def nf4_dequantize(weight, out=None):
    """The bf16/fp16/fp32 matrix of a bitsandbytes ``Params4bit`` (NF4 or FP4, plain or double-quantized absmax).

    On CUDA one Triton launch; elsewhere bitsandbytes' ``dequantize_4bit``. Same values as bitsandbytes
    up to one rounding of the absmax (Triton fuses its multiply-add).
    """
    import torch

    state = weight.quant_state
    packed = weight.data
    if not triton_available(packed.device):
        import bitsandbytes.functional as F

        return F.dequantize_4bit(packed, state, out=out)
    rows, cols = state.shape
    if out is None:
        out = torch.empty((rows, cols), dtype=state.dtype, device=packed.device)
    n_bytes = packed.numel()
    if state.blocksize % 2 or 2 * n_bytes != rows * cols:
        raise ValueError(f"unsupported 4-bit layout: shape {tuple(state.shape)}, {n_bytes} bytes, "
                         f"blocksize {state.blocksize}")
    if state.nested:
        if state.state2.blocksize != NESTED_BLOCK:
            raise ValueError(f"nested absmax blocksize {state.state2.blocksize} (expected {NESTED_BLOCK})")
        absmax, code2, absmax2 = state.absmax, state.state2.code, state.state2.absmax
        offset = _offset(state)
    else:
        absmax, code2, absmax2, offset = state.absmax, state.absmax, state.absmax, 0.0
    tile = 1024
    _triton_kernel()[(triton_cdiv(n_bytes, tile),)](
        packed, absmax, code2, absmax2, state.code, out, offset, n_bytes,
        NESTED=bool(state.nested), BYTES_PER_BLOCK=state.blocksize // 2, BLOCKS_PER_SCALE=NESTED_BLOCK, TILE=tile,
        num_warps=4,
    )
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _offset(state) -> float:
    """The nested absmax offset as a Python float, read from the device once per weight."""
    cached = getattr(state, "_exar_offset", None)
    if cached is None:
        cached = float(state.offset)
        state._exar_offset = cached
    return cached


def _qlora_autograd():
    import torch

    class QLoRA(torch.autograd.Function):
        """y = x W^T + s * dropout(x) A^T B^T with W an NF4 weight decoded on the fly, in both passes."""

        @staticmethod
        def forward(ctx, x, lora_a, lora_b, base, scaling: float, dropout: float):
            flat = x.reshape(-1, x.shape[-1])
            y = torch.mm(flat, nf4_dequantize(base.weight).t())
            mask = None
            if dropout > 0:
                dropped, mask = torch.native_dropout(flat, dropout, True)
            else:
                dropped = flat
            if lora_a is not None:
                down = torch.mm(dropped, lora_a.t())
                y.addmm_(down, lora_b.t(), alpha=scaling)
            else:
                down = None
            ctx.base, ctx.scaling, ctx.keep = base, scaling, 1.0 / (1.0 - dropout)
            ctx.save_for_backward(dropped if lora_a is not None else None, down, lora_a, lora_b, mask)
            return y.view(*x.shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            dropped, down, lora_a, lora_b, mask = ctx.saved_tensors
            needs_x, needs_a, needs_b = ctx.needs_input_grad[:3]
            g = grad.reshape(-1, grad.shape[-1])
            grad_x = grad_a = grad_b = None
            if lora_a is not None:
                grad_down = torch.mm(g, lora_b).mul_(ctx.scaling)
                if needs_b:
                    grad_b = torch.mm(g.t(), down).mul_(ctx.scaling)
                if needs_a:
                    grad_a = torch.mm(grad_down.t(), dropped)
            if needs_x:
                grad_x = torch.mm(g, nf4_dequantize(ctx.base.weight))
                if lora_a is not None:
                    if mask is None:
                        grad_x.addmm_(grad_down, lora_a)
                    else:
                        grad_x.addcmul_(torch.mm(grad_down, lora_a), mask, value=ctx.keep)
                grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[-1])
            return grad_x, grad_a, grad_b, None, None, None

    return QLoRA


QLORA = None


def qlora_linear(x, base, lora_a=None, lora_b=None, scaling: float = 1.0, dropout: float = 0.0):
    """``base(x)`` (+ the LoRA update when ``lora_a``/``lora_b`` are given) through the fused function."""
    global QLORA
    if QLORA is None:
        QLORA = _qlora_autograd()
    return QLORA.apply(x, lora_a, lora_b, base, scaling, dropout)


def _lora_forward(self, x, *args, **kwargs):
    """peft ``lora.Linear4bit.forward`` for the one plain case it patches; peft's own code otherwise."""
    import torch

    adapters = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1
            or self.base_layer.bias is not None):
        return self._exar_peft_forward(x, *args, **kwargs)
    name = adapters[0]
    if name not in self.lora_A or name in self.lora_variant or self.use_dora.get(name, False):
        return self._exar_peft_forward(x, *args, **kwargs)
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    if a.dtype != x.dtype or self.base_layer.weight.quant_state.dtype != x.dtype:
        return self._exar_peft_forward(x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    return qlora_linear(x, self.base_layer, a, b, float(self.scaling[name]), p)


def _nf4_forward(self, x):
    """bitsandbytes ``Linear4bit.forward`` for a frozen bias-free layer in its compute dtype."""
    if self.bias is not None or x.dtype != self.weight.quant_state.dtype or self.weight.requires_grad:
        return self._exar_bnb_forward(x)
    return qlora_linear(x, self)


def patch_qlora(model) -> int:
    """Route every peft LoRA-on-NF4 layer and every bare NF4 layer of ``model`` through ``qlora_linear``.

    Returns how many layers now take the fused path (0 when the model has no 4-bit layers).
    Saved adapters are unchanged: only ``forward`` is replaced, per instance.
    """
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    count = 0
    inside_lora = set()
    for module in model.modules():
        if isinstance(module, LoraLinear4bit) and not hasattr(module, "_exar_peft_forward"):
            module._exar_peft_forward = module.forward
            module.forward = types.MethodType(_lora_forward, module)
            inside_lora.add(id(module.base_layer))
            count += 1
    for module in model.modules():
        if (isinstance(module, bnb.nn.Linear4bit) and id(module) not in inside_lora
                and not hasattr(module, "_exar_bnb_forward")):
            module._exar_bnb_forward = module.forward
            module.forward = types.MethodType(_nf4_forward, module)
            count += 1
    return count


def keep_activations(model, layers: int) -> int:
    """Turn gradient checkpointing off for the last ``layers`` decoder layers (their activations stay
    in memory, their forward is not recomputed); returns how many layers still recompute."""
    blocks = [m for m in model.modules() if getattr(type(m), "gradient_checkpointing", None) is not None
              and hasattr(m, "_gradient_checkpointing_func") and m.gradient_checkpointing]
    for block in blocks[len(blocks) - layers:] if layers > 0 else []:
        block.gradient_checkpointing = False
    return max(len(blocks) - max(layers, 0), 0)


def apply_plan(trainer, plan) -> None:
    """What a device plan asks of this module, on a built trainer: fused layers now, and the layers that
    skip gradient checkpointing once the Trainer has turned checkpointing on (at the start of training)."""
    from transformers import TrainerCallback

    if plan.kernels:
        patch_qlora(trainer.model)
    if plan.keep_layers:
        class KeepActivations(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                keep_activations(model, plan.keep_layers)

        trainer.add_callback(KeepActivations())


def merge_for_generation(model):
    """The model with every NF4 layer decoded once to a dense layer and each LoRA update folded in.

    For generation on a GPU with memory to spare (a 7B model takes 13 GB in bf16): decoding then
    runs plain cuBLAS products instead of 4-bit ones. Returns the bare transformers model; its
    outputs equal the 4-bit + LoRA model's within bf16 rounding of the merged weight.
    """
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dtype = base.get_input_embeddings().weight.dtype
    targets = []
    for parent in base.modules():
        if isinstance(parent, LoraLinear4bit):
            continue
        for name, child in parent.named_children():
            if isinstance(child, (LoraLinear4bit, bnb.nn.Linear4bit)):
                targets.append((parent, name, child))
    for parent, name, child in targets:
        layer = child.base_layer if isinstance(child, LoraLinear4bit) else child
        if getattr(layer.weight, "packing_format_for_cpu", False):
            raise ValueError("merge_for_generation needs the NF4 layout; bitsandbytes repacked this CPU weight")
        weight = nf4_dequantize(layer.weight).float()
        if isinstance(child, LoraLinear4bit):
            for adapter in child.active_adapters:
                a, b = child.lora_A[adapter].weight, child.lora_B[adapter].weight
                weight.addmm_(b.float(), a.float(), alpha=child.scaling[adapter])
        dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                device=weight.device, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        dense.requires_grad_(False)
        setattr(parent, name, dense)
        del weight
    base.is_loaded_in_4bit = False
    if getattr(base, "hf_quantizer", None) is not None:
        base.hf_quantizer = None
    return base
