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
  when nothing upstream needs it (the first layer's input is frozen embeddings);
- nothing of the frozen weight goes through ``save_for_backward``, so under gradient checkpointing
  the recompute stops after the last layer that saved something: down_proj's product (22% of a
  Llama-2-7B layer's) is not recomputed.

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
    def nf4_dequant(packed, absmax, code2, absmax2, offset, nf4, out, n_bytes,
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
            scale = scale + tl.load(offset)
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


def nf4_layout(weight) -> tuple:
    """What decoding a bitsandbytes ``Params4bit`` needs, as tensors and plain values only:
    (packed, absmax, code2, absmax2, offset, code, rows, cols, blocksize, nested, quant_type, dtype).

    torch.compile traces a layer through this tuple without touching bitsandbytes' Python objects.
    Plain absmax fills the nested slots (never read).
    """
    import torch

    state = weight.quant_state
    packed = weight.data.as_subclass(torch.Tensor)
    rows, cols = state.shape
    if state.blocksize % 2 or 2 * packed.numel() != rows * cols:
        raise ValueError(f"unsupported 4-bit layout: shape {tuple(state.shape)}, {packed.numel()} bytes, "
                         f"blocksize {state.blocksize}")
    if state.nested:
        if state.state2.blocksize != NESTED_BLOCK:
            raise ValueError(f"nested absmax blocksize {state.state2.blocksize} (expected {NESTED_BLOCK})")
        absmax, code2, absmax2 = state.absmax, state.state2.code, state.state2.absmax
        offset = torch.as_tensor(state.offset, dtype=torch.float32, device=packed.device).reshape(1)
    else:
        absmax = code2 = absmax2 = offset = state.absmax
    return (packed, absmax, code2, absmax2, offset, state.code, int(rows), int(cols), int(state.blocksize),
            bool(state.nested), state.quant_type, state.dtype)


def _decode(packed, absmax, code2, absmax2, offset, code, rows: int, cols: int, blocksize: int, nested: bool,
            quant_type: str, dtype, out=None):
    """The decoded matrix: one Triton launch on CUDA, bitsandbytes' own operators elsewhere."""
    import torch

    if not triton_available(packed.device):
        if nested:
            absmax = torch.ops.bitsandbytes.dequantize_blockwise(absmax, absmax2, code2, NESTED_BLOCK,
                                                                 torch.float32) + offset
        decoded = torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, blocksize, quant_type, [rows, cols], dtype)
        return decoded if out is None else out.copy_(decoded)
    if out is None:
        out = torch.empty((rows, cols), dtype=dtype, device=packed.device)
    n_bytes = packed.numel()
    tile = 1024
    _triton_kernel()[(triton_cdiv(n_bytes, tile),)](
        packed, absmax, code2, absmax2, offset, code, out, n_bytes,
        NESTED=nested, BYTES_PER_BLOCK=blocksize // 2, BLOCKS_PER_SCALE=NESTED_BLOCK, TILE=tile, num_warps=4,
    )
    return out


def register_decode_op() -> None:
    """``torch.ops.exar.nf4_decode`` (the forward's) and ``torch.ops.exar.nf4_decode_again`` (the backward's):
    ``_decode`` as opaque operators, so a compiled layer calls it as is.

    Two names for one function: torch.compile merges identical calls of one pure operator, and the
    backward would then take the forward's decoded matrices, kept alive in between (bf16, 0.4 GB a
    Llama-2-7B layer), where decoding again is cheap (every decode of a 7B step: 13.5 ms of kernels).
    """
    import torch

    if hasattr(torch.ops.exar, "nf4_decode"):
        return
    schema = ("(Tensor packed, Tensor absmax, Tensor code2, Tensor absmax2, Tensor offset, Tensor code, int rows, "
              "int cols, int blocksize, bool nested, str quant_type, ScalarType dtype) -> Tensor")
    for name in ("nf4_decode", "nf4_decode_again"):
        operator = torch.library.custom_op(f"exar::{name}", _decode_operator, mutates_args=(), schema=schema)
        operator.register_fake(_decode_shape)


def _decode_operator(packed, absmax, code2, absmax2, offset, code, rows, cols, blocksize, nested, quant_type, dtype):
    return _decode(packed, absmax, code2, absmax2, offset, code, rows, cols, blocksize, nested, quant_type, dtype)


def _decode_shape(packed, absmax, code2, absmax2, offset, code, rows, cols, blocksize, nested, quant_type, dtype):
    return packed.new_empty((rows, cols), dtype=dtype)


def decode(layout: tuple, again: bool = False):
    """``nf4_layout``'s matrix; through the registered operator inside torch.compile (``again``: the
    backward's), directly otherwise (the operator's dispatch costs host time in eager mode)."""
    import torch

    if torch.compiler.is_compiling():
        return (torch.ops.exar.nf4_decode_again if again else torch.ops.exar.nf4_decode)(*layout)
    return _decode(*layout)


def nf4_dequantize(weight, out=None):
    """The bf16/fp16/fp32 matrix of a bitsandbytes ``Params4bit`` (NF4 or FP4, plain or double-quantized absmax).

    On CUDA one Triton launch; elsewhere bitsandbytes' operators. Same values as bitsandbytes
    up to one rounding of the absmax (Triton fuses its multiply-add).
    """
    return _decode(*nf4_layout(weight), out=out)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _qlora_autograd():
    import torch

    class QLoRA(torch.autograd.Function):
        """y = x W^T + s * dropout(x) A^T B^T with W an NF4 weight decoded on the fly, in both passes."""

        @staticmethod
        def forward(ctx, x, lora_a, lora_b, scaling: float, dropout: float, *layout):
            flat = x.reshape(-1, x.shape[-1])
            y = torch.mm(flat, decode(layout).t())
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
            # The frozen weight's layout rides on ctx, not in save_for_backward: under gradient checkpointing
            # a saved tensor is one the recompute must reach, and a layer with nothing saved (the last,
            # down_proj, has no LoRA) lets the recompute stop before its product (checkpoint's early stop).
            ctx.layout, ctx.scaling, ctx.keep = layout, scaling, 1.0 / (1.0 - dropout)
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
                grad_x = torch.mm(g, decode(ctx.layout, again=True))
                if lora_a is not None:
                    if mask is None:
                        grad_x.addmm_(grad_down, lora_a)
                    else:
                        grad_x.addcmul_(torch.mm(grad_down, lora_a), mask, value=ctx.keep)
                grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[-1])
            return grad_x, grad_a, grad_b, None, None, *([None] * len(ctx.layout))

    return QLoRA


QLORA = None  # the autograd function, built once before any layer runs (a class built inside torch.compile breaks its graph)


def _qlora_function():
    global QLORA
    if QLORA is None:
        QLORA = _qlora_autograd()
    return QLORA


def qlora_linear(x, base, lora_a=None, lora_b=None, scaling: float = 1.0, dropout: float = 0.0, layout=None):
    """``base(x)`` (+ the LoRA update when ``lora_a``/``lora_b`` are given) through the fused function;
    ``layout`` is ``nf4_layout(base.weight)`` when the caller has it already."""
    import torch

    function = QLORA if torch.compiler.is_compiling() else _qlora_function()  # no test of a class in a graph
    return function.apply(x, lora_a, lora_b, scaling, dropout, *(layout or nf4_layout(base.weight)))


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
    layout = self.base_layer._exar_nf4
    if a.dtype != x.dtype or layout[-1] != x.dtype:
        return self._exar_peft_forward(x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    return qlora_linear(x, None, a, b, float(self.scaling[name]), p, layout)


def _nf4_forward(self, x):
    """bitsandbytes ``Linear4bit.forward`` for a frozen bias-free layer in its compute dtype."""
    if self.bias is not None or x.dtype != self._exar_nf4[-1]:
        return self._exar_bnb_forward(x)
    return qlora_linear(x, None, layout=self._exar_nf4)


def patch_qlora(model) -> int:
    """Route every peft LoRA-on-NF4 layer and every bare NF4 layer of ``model`` through ``qlora_linear``.

    Returns how many layers now take the fused path (0 when the model has no 4-bit layers).
    Saved adapters are unchanged: only ``forward`` is replaced, per instance. Each NF4 layer keeps its
    ``nf4_layout`` (views of its weight, taken now): patch after the model is on its device.
    """
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    register_decode_op()
    _qlora_function()
    count = 0
    inside_lora = set()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and not hasattr(module, "_exar_nf4"):
            module._exar_nf4 = nf4_layout(module.weight)
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


def decoder_layers(model) -> list:
    """The model's decoder layers: transformers' ``GradientCheckpointingLayer`` blocks, in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def keep_activations(model, layers: int) -> int:
    """Turn gradient checkpointing off for the last ``layers`` decoder layers (their activations stay
    in memory, their forward is not recomputed); returns how many layers still recompute."""
    blocks = [m for m in decoder_layers(model) if m.gradient_checkpointing]
    for block in blocks[len(blocks) - layers:] if layers > 0 else []:
        block.gradient_checkpointing = False
    return max(len(blocks) - max(layers, 0), 0)


def compile_layers(model) -> int:
    """torch.compile every decoder layer's forward (regional compilation: the layers share one compiled
    function, so it compiles once, plus once more when the row length first changes and it turns dynamic).

    Inside the graph the NF4 decode is one opaque operator and the rest of the layer (norms, RoPE,
    SwiGLU, the residual adds) is fused by inductor, which also cuts the host time spent launching
    small kernels one by one. A layer that recomputes in the backward (gradient checkpointing on: call
    after the Trainer turned it on) is checkpointed here, around the compiled forward: transformers'
    own wrapper checkpoints ``__call__`` or ``forward`` depending on its version, and a checkpoint
    traced into the graph breaks it.
    """
    import torch

    register_decode_op()
    blocks = decoder_layers(model)
    for block in blocks:
        recompute = block.gradient_checkpointing
        block.gradient_checkpointing = False  # transformers' wrapper now passes straight through
        forward = torch.compile(type(block).forward)
        block.forward = types.MethodType(functools.partial(_checkpointed, forward) if recompute else forward, block)
    return len(blocks)


def _checkpointed(forward, *args, **kwargs):
    import torch.utils.checkpoint

    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_plan(trainer, plan) -> None:
    """What a device plan asks of this module, on a built trainer: fused layers now; once the Trainer
    has turned gradient checkpointing on (at the start of training), the layers that skip it and the
    compiled layers."""
    from transformers import TrainerCallback

    if plan.kernels:
        patch_qlora(trainer.model)
    if plan.keep_layers or plan.compile:
        class AfterCheckpointing(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                keep_activations(model, plan.keep_layers)
                if plan.compile:
                    compile_layers(model)

        trainer.add_callback(AfterCheckpointing())
