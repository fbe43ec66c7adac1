"""The export gate: every file exar-export writes is checked, and the verdict, with each measured
value and its limit, is recorded in the manifest entry as ``gate``. A file whose gate failed stays
on disk for inspection, but export exits with an error, a later export redoes it, and edge and
eval refuse it (and anything made from it) through ``require_passed``.

Limits for quantized files come from llama.cpp's own published figures:
tools/perplexity/README.md at ggml-org/llama.cpp@0c1e57098 ("LLaMA 3 8b Scoreboard": mean KL
divergence to FP16 per type, no importance matrix, except the IQ types, measured there with the
"WT 10m" matrix; "LLaMA 2 vs. LLaMA 3 Quantization comparison": "Same top p", L3 8b column).
Those are means over 300k Wikitext tokens on an 8B model; exar's check set is eight short texts,
and small models lose far more to quantization: measured here, SmolLM2-135M (the demo base) gives
7.0x to 10.0x the 8B figure for q4_0 (10.02x for the demo's trained answer adapter, merged), 4.9x
for q8_0, 2.4x for q4_K_M; stories260K 2.9x for q4_0; random tiny Llamas stay under 0.2x. So the
limit is ``KLD_MARGIN`` times the published mean KLD, and top-1 agreement must keep ``1 - TOP1_MARGIN
x`` the published disagreement. A damaged or mis-converted file lands far beyond (tested).
``--max-kld`` replaces the KLD limit.
"""

from __future__ import annotations

from exar.errors import ExarError

LLAMA_CPP_SOURCE = "llama.cpp tools/perplexity/README.md @ 0c1e57098 (LLaMA 3 8B, vs FP16)"
PUBLISHED_KLD = {
    "q8_0": 0.001355, "q6_k": 0.005452, "q5_k_m": 0.010762, "q5_k_s": 0.016595, "q5_1": 0.018045, "q5_0": 0.022239,
    "q4_k_m": 0.031273, "q4_k_s": 0.043136, "q4_1": 0.071683, "q4_0": 0.071940, "q3_k_l": 0.087176,
    "q3_k_m": 0.101913, "q3_k_s": 0.228217, "q2_k": 0.445132,
    "iq4_nl": 0.035742, "iq4_xs": 0.036334, "iq3_m": 0.102534, "iq3_s": 0.111278, "iq3_xs": 0.138693,
    "iq3_xxs": 0.183625, "iq2_m": 0.325989,
}
PUBLISHED_SAME_TOP = {"q8_0": 0.97674, "q6_k": 0.96031, "q4_k_m": 0.91901, "q2_k": 0.71138}
KLD_MARGIN = 20.0
TOP1_MARGIN = 10.0
# A type llama.cpp publishes no figure for is held to the loosest published one.
_FALLBACK = "q2_k"


# The gate recorded with a file as it is written, replaced by the verdict once it is checked.
PENDING = {"passed": False, "pending": True, "checks": []}


def check(name: str, value: float, limit: float, *, at_most: bool = True, source: str | None = None) -> dict:
    """One measured value against its limit (``at_most``: value <= limit, else value >= limit)."""
    passed = bool(value <= limit if at_most else value >= limit)  # NaN fails either way
    return {"check": name, "value": value, "limit": limit, "at_most": at_most, "passed": passed,
            **({"source": source} if source else {})}


def verdict(checks: list[dict], **facts) -> dict:
    """The gate record of one file: passed only if every check passed."""
    return {"passed": all(c["passed"] for c in checks), "checks": checks, **facts}


def quant_limits(quant: str, max_kld: float | None = None) -> tuple[float, float | None, str]:
    """(mean-KLD limit, top-1 agreement limit or None, where they come from) for a llama.cpp type."""
    published = quant if quant in PUBLISHED_KLD else _FALLBACK
    source = f"{KLD_MARGIN:g} x {LLAMA_CPP_SOURCE} {published}" + ("" if published == quant else f" (none for {quant})")
    kld = KLD_MARGIN * PUBLISHED_KLD[published]
    if max_kld is not None:
        kld, source = float(max_kld), f"--max-kld {max_kld:g}"
    same = PUBLISHED_SAME_TOP.get(quant)
    top1 = None if same is None else max(0.0, 1.0 - TOP1_MARGIN * (1.0 - same))
    return kld, top1, source


def why_failed(gate: dict) -> str:
    """The failed checks in one line: 'mean KL 0.91 > 0.36; top-1 0.41 < 0.59'."""
    if gate.get("pending"):
        return "never checked: the export that wrote it was stopped"
    parts = [f"{c['check']} {c['value']:.4g} {'>' if c['at_most'] else '<'} {c['limit']:.4g}"
             for c in gate.get("checks", []) if not c["passed"]]
    return "; ".join(parts) or "failed"


def require_passed(run, rel: str) -> None:
    """Refuse a recorded file whose export gate failed, or that was made from one that failed."""
    seen, todo = set(), [rel]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        entry = run.entry(current) or {}
        gate = entry.get("gate")
        if gate is not None and not gate.get("passed"):
            what = "failed" if current == rel else f"is made from {current}, which failed"
            raise ExarError(f"{run.path(rel)}: {what} the export gate ({why_failed(gate)}); "
                            f"fix the cause and run `exar-export --run {run.root}` again")
        todo.extend(entry.get("made_from") or [])
