"""The pieces of one QLoRA layer at Llama-2-7B shapes on one GPU, each timed alone (exar.train.kernels' levers).

For each weight shape of a Llama-2-7B decoder layer (q/k/v/o 4096x4096, gate/up 11008x4096, down
4096x11008), NF4 + double quant, at the token count of one padding-free training row (32 dolly-like
examples: 4256 tokens) and at generation batch sizes (1, 64 rows of one token):

  decode bnb      bitsandbytes' dequantize_4bit (absmax decode, offset add, NF4 decode)
  decode exar     exar's one-launch Triton decode (exar.train.kernels.nf4_dequantize)
  matmul bf16     the bf16 product alone (cuBLAS), the floor under any 4-bit layer
  layer peft      peft's LoRA-on-NF4 layer, forward + backward (r=16, dropout 0.05)
  layer exar      exar's fused layer, forward + backward, same weights
  gemm_4bit       bitsandbytes' matmul_4bit forward at generation sizes (its fused 4-bit kernels)

Medians of triton.testing.do_bench (CUDA events). Bytes: the decode reads 0.5 + 1/64 byte and
writes 2 bytes a weight, so its floor is 2.52 bytes x weights over the copy bandwidth measured here.

    python bench/kernels_gpu.py --json kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
TRAIN_TOKENS = 4256


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (the decode's ceiling)."""
    import torch
    import triton

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * src.numel() / (ms / 1000)


def nf4_layer(rows: int, cols: int, seed: int):
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda") * 0.02,
                                     requires_grad=False, compress_statistics=True, quant_type="nf4",
                                     module=layer)._quantize("cuda")
    return layer


def lora_layer(rows: int, cols: int, seed: int):
    import torch
    from peft import LoraConfig, get_peft_model

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nf4_layer(rows, cols, seed)

        def forward(self, x):
            return self.q_proj(x)

    model = One()
    model.is_loaded_in_4bit = True
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj"]))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = (torch.randn_like(param) * 0.02).to(torch.bfloat16)
    return model.train()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=TRAIN_TOKENS, help="rows of the training-size products")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch
    import triton

    from exar.train.kernels import nf4_dequantize, patch_qlora

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    bandwidth = copy_bandwidth()
    rows = []
    for i, (name, (out_f, in_f)) in enumerate(SHAPES.items()):
        layer = nf4_layer(out_f, in_f, seed=i)
        weight = layer.weight
        buffer = torch.empty(out_f, in_f, dtype=torch.bfloat16, device="cuda")
        x = torch.randn(args.tokens, in_f, dtype=torch.bfloat16, device="cuda")
        dense = F.dequantize_4bit(weight.data, weight.quant_state)
        floor_ms = 2.52 * out_f * in_f / bandwidth * 1000
        row = {"weights": name, "shape": [out_f, in_f], "decode_floor_ms": floor_ms,
               "decode_bnb_ms": bench(lambda: F.dequantize_4bit(weight.data, weight.quant_state, out=buffer)),
               "decode_exar_ms": bench(lambda: nf4_dequantize(weight, out=buffer)),
               "matmul_bf16_ms": bench(lambda: torch.mm(x, dense.t()))}
        for m in (1, 64):
            xs = torch.randn(m, in_f, dtype=torch.bfloat16, device="cuda")
            with torch.no_grad():
                row[f"gemm_4bit_m{m}_ms"] = bench(lambda: bnb.matmul_4bit(xs, weight.t(), weight.quant_state))
                row[f"decode_matmul_m{m}_ms"] = bench(lambda: torch.mm(xs, nf4_dequantize(weight, out=buffer).t()))
        if name == "q/k/v/o":
            model = lora_layer(out_f, in_f, seed=i)
            xg = x.clone().requires_grad_()
            grad = torch.randn(args.tokens, out_f, dtype=torch.bfloat16, device="cuda")
            row["layer_peft_ms"] = bench(lambda: model(xg).backward(grad))
            patch_qlora(model)
            row["layer_exar_ms"] = bench(lambda: model(xg).backward(grad))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nQLoRA layer pieces on {torch.cuda.get_device_name()}, {args.tokens} tokens; copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s (read + write)")
    print(f"{'weights':<8} {'decode floor':>12} {'bnb':>7} {'exar':>7} {'bf16 mm':>8} {'peft layer':>10} "
          f"{'exar layer':>10} {'4bit m1':>8} {'deq+mm m1':>9} {'4bit m64':>8} {'deq+mm m64':>10}   (ms)")
    for r in rows:
        print(f"{r['weights']:<8} {r['decode_floor_ms']:>12.3f} {r['decode_bnb_ms']:>7.3f} {r['decode_exar_ms']:>7.3f} "
              f"{r['matmul_bf16_ms']:>8.3f} {r.get('layer_peft_ms', float('nan')):>10.3f} "
              f"{r.get('layer_exar_ms', float('nan')):>10.3f} {r['gemm_4bit_m1_ms']:>8.3f} "
              f"{r['decode_matmul_m1_ms']:>9.3f} {r['gemm_4bit_m64_ms']:>8.3f} {r['decode_matmul_m64_ms']:>10.3f}")
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
                                         "copy_bandwidth": bandwidth, "tokens": args.tokens, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
