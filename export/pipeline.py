"""``export_run``: a run's adapters to verified llama.cpp files, every one recorded in the manifest.

Each artifact carries a recipe (its inputs' hashes and the settings that made it); an artifact
whose recipe and bytes are unchanged is skipped, so a second export only does what changed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from exar.constants import DEFAULT_QUANT, ROLES
from exar.errors import ExarError
from exar.export import layout
from exar.export.hfmodel import LlamaShape
from exar.prompts import PromptStyle
from exar.rundir import Run

_OUTTYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0}
# Approximate bits per weight of llama.cpp's file types, for the disk estimate (unknown: 8.5).
_QUANT_BITS = {"q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q8_0": 8.5, "q2_k": 3.0, "q3_k": 4.0,
               "q4_k": 5.0, "q5_k": 6.0, "q6_k": 6.6}
_DISK_MARGIN = 1.1


def free_bytes(path: Path) -> int:
    """Free space on the file system holding ``path``."""
    return shutil.disk_usage(path).free


@dataclass
class ExportOptions:
    quants: tuple[str, ...] = (DEFAULT_QUANT,)
    mode: str = "both"
    outtype: str = "f16"
    pure: bool = False
    consolidated: bool = True
    merge_base: str = "w16"
    ollama: bool = False
    verbose: bool = False
    threads: int | None = None


@dataclass
class _Step:
    rel: str
    kind: str
    role: str | None
    made_from: list[str]
    recipe: dict
    estimate: float
    make: Callable[[Path], dict]
    is_dir: bool = False
    check: Callable[[], dict] | None = None


def export_run(run: Run, options: ExportOptions | None = None, *, echo: Callable[[str], None] = print) -> dict:
    """Merge, convert, quantize and verify the adapters of ``run``; returns the summary put in run.json."""
    from exar.export.lora import read_adapter
    from exar.export.quantize import check_quant

    options = options or ExportOptions()
    if options.mode not in layout.MODES:
        raise ExarError(f"unknown mode {options.mode!r}; choose one of {', '.join(layout.MODES)}")
    if options.outtype not in layout.OUTTYPES:
        raise ExarError(f"unknown outtype {options.outtype!r}; choose one of {', '.join(layout.OUTTYPES)}")
    for quant in options.quants:
        check_quant(quant)
    settings = run.settings
    if "base" not in settings:
        raise ExarError(f"{run.settings_path}: no base model recorded; train the adapters first (exar-train)")
    base = settings["base"]
    base_dir = Path(base["path"])
    style = PromptStyle.from_dict(settings.get("prompt") or {})
    adapters = {}
    for role in ROLES:
        entries = run.find(kind="adapter", role=role)
        if entries:
            adapters[role] = run.verify(entries[-1]["path"])
    if not adapters:
        raise ExarError(f"{run.root}: no adapters in the manifest; run exar-train first")
    shape = LlamaShape.read(base_dir)
    base_names = (base.get("path", ""), base.get("name", ""), base.get("source", ""))
    for entry in adapters.values():  # refuse a bad adapter before writing anything
        read_adapter(run.path(entry["path"]), base_dir, base_names=base_names)

    steps = _plan(run, options, base, base_dir, shape, adapters, style, base_names)
    todo = [s for s in steps if not _is_done(run, s)]
    _check_disk(run.root, todo)
    results = {}
    for step in steps:
        if step not in todo:
            echo(f"unchanged: {step.rel}")
            results[step.rel] = run.entry(step.rel)
            continue
        echo(f"writing {step.rel}")
        with run.writing(step.rel, step.kind, role=step.role, made_from=step.made_from, is_dir=step.is_dir) as tmp:
            facts = step.make(tmp)
        run.annotate(step.rel, recipe=step.recipe, **(facts or {}))
        if step.check is not None:
            verify = step.check()
            run.annotate(step.rel, verify=verify)
            if verify.get("passed") is False:
                raise ExarError(f"{run.path(step.rel)}: verification failed: {_why(verify)}")
        results[step.rel] = run.entry(step.rel)
    if run.path(layout.LOG_REL).is_file():
        run.record(layout.LOG_REL, "log", made_from=[s.rel for s in steps if "quant" in s.recipe.get("settings", {})])

    summary = {
        "quants": list(options.quants), "outtype": options.outtype, "mode": options.mode, "pure": options.pure,
        "merge_base": options.merge_base, "consolidated": options.consolidated, "roles": list(adapters),
        "verification": {rel: e.get("verify") for rel, e in results.items() if e and e.get("verify")},
    }
    run.update_settings("export", summary)
    return summary


def _why(verify: dict) -> str:
    if not verify.get("vocab_equal", True):
        return f"vocabulary differs from the HF tokenizer ({'; '.join(verify['vocab_mismatches'][:2])})"
    if not verify.get("token_ids_equal", True):
        bad = verify["token_mismatches"][0]
        return f"token ids differ from the HF tokenizer on {bad['text']!r}"
    return f"logits differ by {verify['logit_rel_max_diff']:.2e} (tolerance {verify['logit_tolerance']:.0e})"


def _is_done(run: Run, step: _Step) -> bool:
    entry = run.entry(step.rel)
    return entry is not None and run.has(step.rel) and entry.get("recipe") == step.recipe


def _check_disk(root: Path, todo: list[_Step]) -> None:
    need = sum(step.estimate for step in todo) * _DISK_MARGIN
    free = free_bytes(root)
    if need > free:
        raise ExarError(f"{root}: not enough free disk for this export: it needs about {_size(need)}, {_size(free)} "
                        "are free; free space or export fewer types (--quant/--mode/--no-consolidated)")


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _quant_bytes(n_params: int, quant: str) -> float:
    family = quant.split("_k")[0] + "_k" if "_k" in quant else quant
    return n_params * _QUANT_BITS.get(family, 8.5) / 8


def _plan(run: Run, o: ExportOptions, base: dict, base_dir: Path, shape: LlamaShape, adapters: dict,
          style: PromptStyle, base_names: tuple) -> list[_Step]:
    """Every artifact the options ask for, in dependency order."""
    from exar.export.consolidated import write_consolidated
    from exar.export.lora import write_lora_gguf
    from exar.export.merge import merge_adapter
    from exar.export.ollama import modelfile_text
    from exar.export.quantize import quantize_gguf
    from exar.export.verify import compare_quantized, verify_gguf
    from exar.export.writer import write_gguf

    n = shape.n_params
    log = run.path(layout.LOG_REL)
    full_bytes = n * _OUTTYPE_BYTES[o.outtype]
    base_key = {"base": base["fingerprint"]}
    steps: list[_Step] = []

    def add_gguf_family(name: str, hf_dir: Callable[[], Path], inputs: dict, made_from: list[str]) -> None:
        full_rel = layout.gguf_rel(name, o.outtype)
        full = run.path(full_rel)
        steps.append(_Step(
            full_rel, "gguf-base" if name == layout.BASE else "gguf-merged", None if name == layout.BASE else name,
            made_from, {"from": inputs, "settings": {"outtype": o.outtype}}, full_bytes,
            lambda tmp: write_gguf(hf_dir(), tmp, o.outtype, name=f"{base['name']}-{name}"),
            check=lambda: verify_gguf(full, hf_dir(), outtype=o.outtype, style=style)))
        full_recipe = steps[-1].recipe
        kind, role = ("gguf-base", None) if name == layout.BASE else ("gguf-merged", name)
        for quant in o.quants:
            rel = layout.gguf_rel(name, quant)
            steps.append(_Step(
                rel, kind, role, [full_rel], {"from": full_recipe, "settings": {"quant": quant, "pure": o.pure}},
                _quant_bytes(n, quant),
                lambda tmp, quant=quant: quantize_gguf(full, tmp, quant, pure=o.pure, log_path=log, verbose=o.verbose,
                                                       threads=o.threads),
                check=lambda rel=rel: compare_quantized(run.path(rel), full, style=style)))

    if o.mode in ("adapters", "both"):
        add_gguf_family(layout.BASE, lambda: base_dir, base_key, [])
        base_full = run.path(layout.gguf_rel(layout.BASE, o.outtype))
        for role, entry in adapters.items():
            adapter_dir = run.path(entry["path"])
            rel = layout.lora_rel(role)
            steps.append(_Step(
                rel, "gguf-lora", role, [entry["path"]], {"from": {entry["path"]: entry["sha256"], **base_key}, "settings": {}},
                2 * entry["bytes"],
                lambda tmp, adapter_dir=adapter_dir: write_lora_gguf(adapter_dir, base_dir, tmp, base_names=base_names),
                check=lambda rel=rel, adapter_dir=adapter_dir: verify_gguf(
                    base_full, base_dir, outtype=o.outtype, style=style, lora_path=run.path(rel), adapter_dir=adapter_dir)))
            for quant in o.quants:
                if o.ollama:
                    steps.append(_modelfile_step(run, role, quant, True, style, modelfile_text))

    if o.mode in ("merged", "both"):
        for role, entry in adapters.items():
            hf_rel = layout.hf_rel(role)
            hf_dir = run.path(hf_rel)
            inputs = {entry["path"]: entry["sha256"], **base_key}
            merged_recipe = {"from": inputs, "settings": {"merge_base": o.merge_base, "outtype": o.outtype}}
            steps.append(_Step(
                hf_rel, "hf-merged", role, [entry["path"]], merged_recipe, full_bytes,
                lambda tmp, adapter_dir=run.path(entry["path"]): merge_adapter(
                    base_dir, adapter_dir, tmp, merge_base=o.merge_base, dtype=o.outtype, base_names=base_names),
                is_dir=True))
            merged_inputs = {hf_rel: merged_recipe}
            if o.consolidated:
                steps.append(_Step(
                    layout.consolidated_rel(role), "consolidated", role, [hf_rel], {"from": merged_inputs, "settings": {}},
                    full_bytes, lambda tmp, hf_dir=hf_dir: write_consolidated(hf_dir, tmp), is_dir=True))
            add_gguf_family(role, lambda hf_dir=hf_dir: hf_dir, merged_inputs, [hf_rel])
            for quant in o.quants:
                if o.ollama:
                    steps.append(_modelfile_step(run, role, quant, False, style, modelfile_text))
    return steps


def _modelfile_step(run: Run, role: str, quant: str, adapters: bool, style: PromptStyle, modelfile_text) -> _Step:
    rel = layout.modelfile_rel(role, quant, adapters)
    model = layout.gguf_rel(layout.BASE if adapters else role, quant)
    lora = layout.lora_rel(role) if adapters else None
    text = modelfile_text(role, Path(model).name, style, Path(lora).name if lora else None)
    def write(tmp: Path) -> dict:
        tmp.write_text(text, encoding="utf-8")
        return {}

    return _Step(rel, "modelfile", role, [model] + ([lora] if lora else []), {"from": {"text": text}, "settings": {}},
                 len(text), write)
