"""Speed and memory of exar's edge runtime, as ratios against baselines measured in the same run.

A random-weight Llama at TinyLlama-1.1B shape (speed and memory do not depend on the values)
with the Llama-2 tokenizer from ../shared, exported with exar's own writer and quantized to q4_0
by llama.cpp; three random LoRA adapters (r=16, q/k/v/o) exported as LoRA GGUFs; "merged" role
models are byte copies of the q4_0 base (a merged model has the base's shapes and types).

  1. decode tok/s, exar runtime / bare llama-cpp-python (``Llama.generate``), same GGUF, same threads
  2. decode tok/s, exar q4_0 / transformers CPU fp32 and bf16, same model
  3. decode tok/s x model bytes / measured memory read bandwidth (torch sum over 1 GiB, same threads)
  4. peak RSS, adapters mode / merged mode, three roles each used once (one process per mode)
  5. time of one verdict (p(CORRECT), one forward pass) / time to generate the label as text
     (the same prompt, greedy, as many tokens as "CORRECT" + end of text), validator adapter

Decode tok/s = extra tokens / extra time between a 1-token and a (1+N)-token generation from the
same prompt (cached by llama.cpp), so prompt processing cancels out; each time is the fastest of
--repeats rounds in which all contestants take turns, so load from other processes hits them alike.

    python bench/edge.py                      # build in bench/out/edge (about 3 min), then measure
    python bench/edge.py --reuse --threads 2  # keep the built files from an earlier run
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "models" / "llama2-tokenizer"
TINYLLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5)
ROLES = ("answer", "validator", "exar")
PROMPT_QUESTION = "What is the name of the largest planet of the solar system, and who named it?"
CANDIDATES = ["Jupiter, named by the Romans", "Saturn", "It is Jupiter.", "Mars, by the Greeks",
              "The largest planet is Neptune", "Venus", "Jupiter was named after the king of the gods",
              "Earth, by nobody"]
TARGETS = {"runtime/bare": (">=", 0.95), "q4_0/fp32": (">=", 6.0), "q4_0/bf16": (">=", 4.0),
           "bandwidth use": (">=", 0.8), "RSS adapters/merged": ("<=", 0.45), "verdict/label text": ("<=", 0.5),
           "verdict/label text, cold": ("<=", 0.5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "edge")
    parser.add_argument("--threads", type=int, default=None, help="default: the physical cores")
    parser.add_argument("--tokens", type=int, default=32, help="N extra decode tokens for llama.cpp")
    parser.add_argument("--hf-tokens", type=int, default=8, help="N extra decode tokens for transformers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reuse", action="store_true", help="reuse the model files built by an earlier run")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--rss", choices=["adapters", "merged"], help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()

    from exar.edge.runtime import physical_cores

    threads = args.threads or physical_cores()
    files = model_files(args.out)
    if args.rss:
        print(json.dumps(rss_child(files, args.rss, threads)))
        return
    start = time.perf_counter()
    results = {"threads": threads}
    if not (args.reuse and all(p.is_file() for p in files["all"])):
        build(args.out, files, threads)
    results.update(decode_rates(files, threads, args))
    results["bandwidth_gbs"] = memory_bandwidth(threads)
    results["model_bytes"] = files["merged"]["answer"].stat().st_size
    results.update(verdict_vs_text(files, threads, args.repeats))
    for mode in ("adapters", "merged"):
        child = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--threads", str(threads),
                                "--rss", mode], capture_output=True, text=True, check=True)
        results[f"rss_{mode}_mb"] = json.loads(child.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    results["seconds"] = round(time.perf_counter() - start, 1)
    report(results, args)


# --- the model files --------------------------------------------------------------------------

def model_files(out: Path) -> dict:
    files = {"hf": out / "hf", "f16": out / "base.f16.gguf", "q4_0": out / "base.q4_0.gguf",
             "loras": {r: out / f"{r}.lora.gguf" for r in ROLES},
             "merged": {r: out / f"{r}.q4_0.gguf" for r in ROLES}}
    files["all"] = [files["q4_0"], *files["loras"].values(), *files["merged"].values(), files["hf"] / "config.json"]
    return files


def build(out: Path, files: dict, threads: int) -> None:
    """Random 1.1B Llama -> HF folder (bf16) -> GGUF f16 -> q4_0, and three LoRA GGUFs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from exar.export.lora import write_lora_gguf
    from exar.export.quantize import quantize_gguf
    from exar.export.writer import write_gguf
    from exar.progress import status

    if not (TOKENIZER / "tokenizer.model").is_file():
        sys.exit(f"{TOKENIZER} is absent (it comes with ../shared)")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    torch.manual_seed(0)
    with status("random Llama at TinyLlama-1.1B shape"):
        model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA_1B, bos_token_id=1, eos_token_id=2)).eval()
    with status("saving the HF folder (bf16)"):
        model.to(torch.bfloat16).save_pretrained(str(files["hf"]))
        for name in ("tokenizer.model", "tokenizer_config.json"):
            shutil.copy2(TOKENIZER / name, files["hf"] / name)
    with status("three random LoRA adapters (r=16, q/k/v/o)"):
        for seed, role in enumerate(ROLES, start=1):
            torch.manual_seed(seed)
            peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
            with torch.no_grad():
                for name, param in peft_model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0.0, 0.02)
            peft_model.save_pretrained(str(out / "adapters" / role))
            model = peft_model.unload()
    del model, peft_model
    write_gguf(files["hf"], files["f16"], "f16")
    with status("quantizing to q4_0 with llama.cpp"):
        quantize_gguf(files["f16"], files["q4_0"], "q4_0", threads=threads, log_path=out / "llama-cpp.log")
    files["f16"].unlink()
    for role in ROLES:
        write_lora_gguf(out / "adapters" / role, files["hf"], files["loras"][role])
        shutil.copyfile(files["q4_0"], files["merged"][role])


# --- measurements -----------------------------------------------------------------------------

def decode_times(generate, n: int) -> tuple[float, float, int]:
    """(time of a 1-token generation, time of a (1+n)-token one, extra tokens), prompt cached."""
    generate(1)  # warm: the prompt is cached from here on (llama.cpp)
    start = time.perf_counter()
    short = generate(1)
    middle = time.perf_counter()
    long = generate(1 + n)
    return middle - start, time.perf_counter() - middle, long - short


def decode_rates(files: dict, threads: int, args) -> dict:
    """Decode tok/s of every contestant, measured in turns ``args.repeats`` times; the best of each.

    exar's runtime (merged: the bare role GGUF; adapters: base + LoRA switched per call), bare
    llama-cpp-python on the same GGUF, transformers fp32 and bf16 on the same model; all loaded at
    once (about 8 GiB), so load from other processes hits them alike.
    """
    import torch
    from exar.llamacpp import load_llama_cpp

    Llama = load_llama_cpp().Llama  # the same workaround as exar's runtime, for a fair comparison
    from transformers import AutoModelForCausalLM

    from exar.edge.runtime import EdgeModels, LlamaRuntime
    from exar.prompts import PLAIN, render_answer
    from exar.progress import status

    torch.set_num_threads(threads)
    prompt = render_answer(PROMPT_QUESTION)
    with status(f"loading the contestants ({threads} threads)"):
        hf = {dtype: AutoModelForCausalLM.from_pretrained(str(files["hf"]), dtype=dtype).eval()
              for dtype in (torch.float32, torch.bfloat16)}
        bare = Llama(model_path=str(files["merged"]["answer"]), n_ctx=2048, n_batch=512, n_threads=threads,
                     n_threads_batch=threads, verbose=False)
        merged = LlamaRuntime(EdgeModels("merged", "q4_0", merged=files["merged"]), PLAIN, threads=threads)
        adapters = LlamaRuntime(EdgeModels("adapters", "q4_0", base=files["q4_0"], loras=files["loras"]), PLAIN,
                                threads=threads)
    bare_tokens = bare.tokenize(prompt.encode())
    hf_ids = torch.tensor([bare_tokens])

    def bare_generate(k: int) -> int:
        count = 0
        for _ in bare.generate(bare_tokens, temp=0.0, top_k=1, repeat_penalty=1.0):
            count += 1
            if count == k:
                break
        return count

    def exar_generate(runtime):
        return lambda k: runtime.generate("answer", prompt, temperature=0.0, top_p=1.0, seed=0,
                                          max_new_tokens=k).tokens

    def hf_generate(model):
        def generate(k: int) -> int:
            with torch.inference_mode():
                out = model.generate(hf_ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
            return out.shape[1] - hf_ids.shape[1]
        return generate

    contestants = {
        "exar_merged_tps": (exar_generate(merged), args.tokens),
        "exar_adapters_tps": (exar_generate(adapters), args.tokens),
        "bare_tps": (bare_generate, args.tokens),
        "hf_fp32_tps": (hf_generate(hf[torch.float32]), args.hf_tokens),
        "hf_bf16_tps": (hf_generate(hf[torch.bfloat16]), args.hf_tokens),
    }
    times = {name: [] for name in contestants}
    for repeat in range(args.repeats):
        with status(f"decode rates, round {repeat + 1} of {args.repeats}"):
            for name, (generate, n) in contestants.items():
                times[name].append(decode_times(generate, n))
    for runtime in (merged, adapters):
        runtime.close()
    bare.close()
    # other processes only ever add time: the fastest short and long runs are the least disturbed
    return {name: min(t[2] for t in runs) / (min(t[1] for t in runs) - min(t[0] for t in runs))
            for name, runs in times.items()}


def memory_bandwidth(threads: int) -> float:
    """GB/s of reading 1 GiB (torch sum, ``threads`` threads), best of 5."""
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(2**28, dtype=torch.float32)
    best = min(_timed(lambda: data.sum().item()) for _ in range(5))
    return data.numel() * 4 / best / 1e9


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def verdict_vs_text(files: dict, threads: int, repeats: int) -> dict:
    """Median time of a p(CORRECT) verdict and of generating the label as text, taken in turns.

    warm: a new candidate for a question already validated (the loop's rounds 2..; the question's
    prefix is cached); cold: a new question (round 1).
    """
    from exar.edge.runtime import EdgeModels, LlamaRuntime
    from exar.prompts import CORRECT, PLAIN, render_validator
    from exar.progress import status

    times = {key: [] for key in ("warm_verdict", "warm_text", "cold_verdict", "cold_text")}
    with status("verdict (one forward pass) vs the label generated as text"), \
            LlamaRuntime(EdgeModels("adapters", "q4_0", base=files["q4_0"], loras=files["loras"]), PLAIN,
                         threads=threads) as runtime:
        first = render_validator(PROMPT_QUESTION, CANDIDATES[0])
        label_tokens = len(runtime.tokenize(first + CORRECT)) - len(runtime.tokenize(first)) + 1
        runtime.p_correct(first)

        def text(prompt: str) -> None:
            runtime.generate("validator", prompt, temperature=0.0, top_p=1.0, seed=0, max_new_tokens=label_tokens)

        for cache in ("warm", "cold"):  # one after the other: a cold prompt evicts the warm prefix
            for index, candidate in enumerate(CANDIDATES[1:] * repeats):
                question = PROMPT_QUESTION if cache == "warm" else f"{index} {cache}: {PROMPT_QUESTION}"
                prompt = render_validator(question, f"{candidate} ({index})")
                if index % 2:
                    times[f"{cache}_verdict"].append(_timed(lambda: runtime.p_correct(prompt)))
                else:
                    times[f"{cache}_text"].append(_timed(lambda: text(prompt)))
    medians = {f"{key}_ms": statistics.median(values) * 1000 for key, values in times.items()}
    return {**medians, "label_tokens": label_tokens}


def rss_child(files: dict, mode: str, threads: int) -> dict:
    """Peak RSS of a process that loads one mode and answers one question with all three roles."""
    from exar.edge.loop import LoopSettings, run_loop
    from exar.edge.runtime import EdgeModels, LlamaRuntime
    from exar.resources import peak_rss_mb
    from exar.prompts import PLAIN

    models = (EdgeModels("adapters", "q4_0", base=files["q4_0"], loras=files["loras"]) if mode == "adapters"
              else EdgeModels("merged", "q4_0", merged=files["merged"]))
    with LlamaRuntime(models, PLAIN, threads=threads) as runtime:
        result = run_loop(runtime, PROMPT_QUESTION, settings=LoopSettings(threshold=1.0, max_rounds=2,
                                                                          max_new_tokens=4))
    return {"mode": mode, "peak_rss_mb": peak_rss_mb(), "rounds": len(result.rounds)}


# --- the report -------------------------------------------------------------------------------

def report(results: dict, args) -> None:
    r = results
    ratios = {
        "runtime/bare": r["exar_merged_tps"] / r["bare_tps"],
        "q4_0/fp32": r["exar_merged_tps"] / r["hf_fp32_tps"],
        "q4_0/bf16": r["exar_merged_tps"] / r["hf_bf16_tps"],
        "bandwidth use": r["exar_merged_tps"] * r["model_bytes"] / (r["bandwidth_gbs"] * 1e9),
        "RSS adapters/merged": r["rss_adapters_mb"] / r["rss_merged_mb"],
        "verdict/label text": r["warm_verdict_ms"] / r["warm_text_ms"],
        "verdict/label text, cold": r["cold_verdict_ms"] / r["cold_text_ms"],
    }
    r["ratios"] = ratios
    print(f"\nexar edge bench: random Llama at TinyLlama-1.1B shape, q4_0 {r['model_bytes'] / 2**20:.0f} MiB, "
          f"{r['threads']} threads, {r['seconds']:.0f} s")
    print(f"  decode tok/s: exar merged {r['exar_merged_tps']:.2f}, exar adapters (LoRA on) "
          f"{r['exar_adapters_tps']:.2f}, bare llama-cpp-python {r['bare_tps']:.2f}, "
          f"transformers fp32 {r['hf_fp32_tps']:.2f}, bf16 {r['hf_bf16_tps']:.2f}")
    print(f"  memory read bandwidth {r['bandwidth_gbs']:.1f} GB/s (bare llama.cpp uses "
          f"{r['bare_tps'] * r['model_bytes'] / (r['bandwidth_gbs'] * 1e9):.2f} of it); peak RSS adapters {r['rss_adapters_mb']:.0f} MiB, "
          f"merged {r['rss_merged_mb']:.0f} MiB")
    print(f"  verdict {r['warm_verdict_ms']:.0f} ms warm / {r['cold_verdict_ms']:.0f} ms cold; label as text "
          f"({r['label_tokens']} tokens) {r['warm_text_ms']:.0f} ms warm / {r['cold_text_ms']:.0f} ms cold")
    for name, value in ratios.items():
        sense, target = TARGETS[name]
        met = value >= target if sense == ">=" else value <= target
        print(f"  {name:<25} {value:6.2f}   target {sense} {target:<5} {'met' if met else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    print(f"\nmachine: {platform.processor() or platform.machine()}, {r['threads']} threads, "
          f"{datetime.now(timezone.utc):%Y-%m-%d}")


if __name__ == "__main__":
    main()
