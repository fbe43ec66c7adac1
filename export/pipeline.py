"""``export_run``: a run's adapters to llama.cpp files, every one checked by the export gate and recorded.

Each artifact carries a recipe (its inputs' hashes and the settings that made it); an artifact
whose recipe and bytes are unchanged and whose gate passed is skipped, so a second export only
does what changed or failed. A failed gate is recorded on the file's manifest entry (``gate``)
and stops the export with an error; edge and eval refuse such a file (``exar.export.gate``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from exar.constants import DEFAULT_QUANT, ROLES
from exar.errors import ExarError
from exar.export import layout
from exar.export.disk import human
from exar.export.gate import PENDING, verdict, why_failed
from exar.prompts import PromptStyle
from exar.rundir import Run, writes_run

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
    pre_tokenizer: str | None = None   # llama.cpp's BPE pre-tokenizer name, when its hash is unknown
    max_kld: float | None = None       # replaces the per-type mean-KLD limit of the gate


@dataclass
class _Step:
    rel: str
    kind: str
    role: str | None
    made_from: list[str]
    recipe: dict
    estimate: float
    make: Callable[[Path], dict]
    check: Callable[[], dict]
    is_dir: bool = False


@writes_run("export")
def export_run(run: Run, options: ExportOptions | None = None, *, echo: Callable[[str], None] = print) -> dict:
    """Merge, convert, quantize and check the adapters of ``run``; returns the summary put in run.json."""
    from exar.export.lora import read_adapter
    from exar.export.quantize import check_quant
    from exar.llamacpp import show_native_log

    options = options or ExportOptions()
    show_native_log(options.verbose)  # llama.cpp's own lines (loads, "lora ... cannot use buft") off the terminal
    if options.mode not in layout.MODES:
        raise ExarError(f"unknown mode {options.mode!r}; choose one of {', '.join(layout.MODES)}")
    if options.outtype not in layout.OUTTYPES:
        raise ExarError(f"unknown outtype {options.outtype!r}; choose one of {', '.join(layout.OUTTYPES)}")
    if options.max_kld is not None and not options.max_kld > 0:
        raise ExarError(f"--max-kld must be above 0, not {options.max_kld}")
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
    stale = run.stale()
    for role, entry in adapters.items():  # an adapter trained on data redone since is not what the run says
        if entry["path"] in stale:
            from exar.train.settings import ROLE_SECTIONS

            raise ExarError(f"{run.path(entry['path'])} is stale: {'; '.join(stale[entry['path']])}; retrain it "
                            f"(`exar-train {ROLE_SECTIONS[role]} --run {run.root} --force`) before exporting")
    base_names = (base.get("path", ""), base.get("name", ""), base.get("source", ""))
    for entry in adapters.values():  # refuse a bad adapter before writing anything
        read_adapter(run.path(entry["path"]), base_dir, base_names=base_names)

    steps = _plan(run, options, base, base_dir, adapters, style, base_names)
    todo = [s for s in steps if not _is_done(run, s)]
    _check_disk(run.root, todo, echo)
    gates = {}
    for step in steps:
        if step not in todo:
            echo(f"unchanged: {step.rel}")
            gates[step.rel] = run.entry(step.rel).get("gate")
            continue
        echo(f"writing {step.rel}")
        with run.writing(step.rel, step.kind, role=step.role, made_from=step.made_from, is_dir=step.is_dir,
                         gate=PENDING) as tmp:  # a file killed before its check is refused as unchecked
            facts = step.make(tmp)
        run.annotate(step.rel, recipe=step.recipe, **(facts or {}))
        gate = step.check()
        run.annotate(step.rel, gate=gate)
        gates[step.rel] = gate
        if not gate["passed"]:
            raise ExarError(f"{run.path(step.rel)}: failed the export gate: {why_failed(gate)} (recorded as failed in "
                            f"{run.manifest_path.name}; edge and eval refuse it)")
    if run.path(layout.LOG_REL).is_file():
        run.record(layout.LOG_REL, "log", made_from=[s.rel for s in steps if "quant" in s.recipe.get("settings", {})])

    summary = {
        "quants": list(options.quants), "outtype": options.outtype, "mode": options.mode, "pure": options.pure,
        "merge_base": options.merge_base, "consolidated": options.consolidated, "roles": list(adapters),
        "max_kld": options.max_kld, "gates": gates,
    }
    run.update_settings("export", summary)
    return summary


def _is_done(run: Run, step: _Step) -> bool:
    entry = run.entry(step.rel)
    return (entry is not None and run.has(step.rel) and entry.get("recipe") == step.recipe
            and (entry.get("gate") or {}).get("passed") is True)


def _check_disk(root: Path, todo: list[_Step], echo: Callable[[str], None]) -> None:
    need = sum(step.estimate for step in todo)
    free = free_bytes(root)
    if todo:
        echo(f"disk: this export writes about {human(need)} ({len(todo)} files; {human(free)} free)")
    if need * _DISK_MARGIN > free:
        raise ExarError(f"{root}: not enough free disk for this export: it needs about {human(need)}, {human(free)} "
                        "are free; free space or export fewer types (--quant/--mode/--no-consolidated)")


def _plan(run: Run, o: ExportOptions, base: dict, base_dir: Path, adapters: dict, style: PromptStyle,
          base_names: tuple) -> list[_Step]:
    """Every artifact the options ask for, in dependency order, each with its gate."""
    from exar.export import disk
    from exar.export.consolidated import consolidated_layout, write_consolidated
    from exar.export.hfmodel import TensorSource
    from exar.export.lora import write_lora_gguf
    from exar.export.merge import merge_adapter
    from exar.export.ollama import modelfile_text
    from exar.export.quantize import quantize_gguf
    from exar.export.verify import ReferenceCache, check_consolidated, check_merged, compare_quantized, verify_gguf
    from exar.export.writer import write_gguf

    log = run.path(layout.LOG_REL)
    source = TensorSource(base_dir)
    cache = ReferenceCache()
    base_key = {"base": base["fingerprint"]}
    gguf_settings = {"outtype": o.outtype, "pre_tokenizer": o.pre_tokenizer}
    steps: list[_Step] = []

    def quant_gate(rel: str, full: Path, quant: str, lora: Path | None = None) -> dict:
        return compare_quantized(run.path(rel), full, quant=quant, style=style, lora_path=lora, max_kld=o.max_kld)

    def add_gguf_family(name: str, hf_dir: Path, inputs: dict, made_from: list[str]) -> None:
        full_rel = layout.gguf_rel(name, o.outtype)
        full = run.path(full_rel)
        kind, role = ("gguf-base", None) if name == layout.BASE else ("gguf-merged", name)
        steps.append(_Step(
            full_rel, kind, role, made_from, {"from": inputs, "settings": gguf_settings}, disk.gguf_bytes(source, o.outtype),
            lambda tmp: write_gguf(hf_dir, tmp, o.outtype, name=f"{base['name']}-{name}", pre_tokenizer=o.pre_tokenizer),
            lambda: verify_gguf(full, hf_dir, outtype=o.outtype, style=style, cache=cache)))
        full_recipe = steps[-1].recipe
        for quant in o.quants:
            rel = layout.gguf_rel(name, quant)
            steps.append(_Step(
                rel, kind, role, [full_rel],
                {"from": full_recipe, "settings": {"quant": quant, "pure": o.pure, "max_kld": o.max_kld}},
                disk.quant_bytes(source, quant, o.pure),
                lambda tmp, quant=quant: quantize_gguf(full, tmp, quant, pure=o.pure, log_path=log,
                                                       threads=o.threads),
                lambda rel=rel, quant=quant: quant_gate(rel, full, quant)))

    if o.mode in ("adapters", "both"):
        add_gguf_family(layout.BASE, base_dir, base_key, [])
        base_full = run.path(layout.gguf_rel(layout.BASE, o.outtype))
        for role, entry in adapters.items():
            adapter_dir = run.path(entry["path"])
            rel = layout.lora_rel(role)

            def lora_gate(rel=rel, adapter_dir=adapter_dir) -> dict:
                """base + LoRA against transformers + PEFT, then each quantized base + LoRA against the f16 base + LoRA."""
                gate = verify_gguf(base_full, base_dir, outtype=o.outtype, style=style, lora_path=run.path(rel),
                                   adapter_dir=adapter_dir, cache=cache)
                checks = list(gate["checks"])
                for quant in o.quants:
                    quantized = quant_gate(layout.gguf_rel(layout.BASE, quant), base_full, quant, run.path(rel))
                    checks += [dict(c, check=f"on the {quant} base: {c['check']}") for c in quantized["checks"]]
                return verdict(checks, texts=gate["texts"], token_mismatches=gate["token_mismatches"])

            steps.append(_Step(
                rel, "gguf-lora", role, [entry["path"]] + [layout.gguf_rel(layout.BASE, q) for q in o.quants],
                {"from": {entry["path"]: entry["sha256"], **base_key},
                 "settings": {"quants": list(o.quants), "outtype": o.outtype, "max_kld": o.max_kld}},
                disk.lora_bytes(adapter_dir),
                lambda tmp, adapter_dir=adapter_dir: write_lora_gguf(adapter_dir, base_dir, tmp, base_names=base_names),
                lora_gate))
            if o.ollama:
                for quant in o.quants:
                    steps.append(_modelfile_step(run, role, quant, True, style, modelfile_text))

    if o.mode in ("merged", "both"):
        if o.consolidated:
            consolidated_layout(base_dir)  # refuse a model Meta's layout cannot hold before writing anything
        for role, entry in adapters.items():
            hf_rel = layout.hf_rel(role)
            hf_dir = run.path(hf_rel)
            adapter_dir = run.path(entry["path"])
            inputs = {entry["path"]: entry["sha256"], **base_key}
            merged_recipe = {"from": inputs, "settings": {"merge_base": o.merge_base, "outtype": o.outtype}}
            steps.append(_Step(
                hf_rel, "hf-merged", role, [entry["path"]], merged_recipe, disk.checkpoint_bytes(source, o.outtype),
                lambda tmp, adapter_dir=adapter_dir: merge_adapter(
                    base_dir, adapter_dir, tmp, merge_base=o.merge_base, dtype=o.outtype, base_names=base_names),
                lambda hf_dir=hf_dir, adapter_dir=adapter_dir: check_merged(
                    hf_dir, base_dir, adapter_dir, dtype=o.outtype, style=style, cache=cache, merge_base=o.merge_base),
                is_dir=True))
            merged_inputs = {hf_rel: merged_recipe}
            if o.consolidated:
                rel = layout.consolidated_rel(role)
                steps.append(_Step(
                    rel, "consolidated", role, [hf_rel], {"from": merged_inputs, "settings": {}},
                    disk.checkpoint_bytes(source, o.outtype, explicit_output=True),
                    lambda tmp, hf_dir=hf_dir: write_consolidated(hf_dir, tmp),
                    lambda rel=rel, hf_dir=hf_dir: check_consolidated(run.path(rel), hf_dir), is_dir=True))
            add_gguf_family(role, hf_dir, merged_inputs, [hf_rel])
            if o.ollama:
                for quant in o.quants:
                    steps.append(_modelfile_step(run, role, quant, False, style, modelfile_text))
    return steps


def _modelfile_step(run: Run, role: str, quant: str, adapters: bool, style: PromptStyle, modelfile_text) -> _Step:
    from exar.export.gate import check

    rel = layout.modelfile_rel(role, quant, adapters)
    model = layout.gguf_rel(layout.BASE if adapters else role, quant)
    lora = layout.lora_rel(role) if adapters else None
    named = [model] + ([lora] if lora else [])
    text = modelfile_text(role, Path(model).name, style, Path(lora).name if lora else None)

    def write(tmp: Path) -> dict:
        tmp.write_text(text, encoding="utf-8")
        return {}

    def gate() -> dict:
        """The files FROM / ADAPTER name sit beside it, and passed their own gates."""
        bad = [n for n in named if not run.has(n) or not ((run.entry(n) or {}).get("gate") or {}).get("passed")]
        return verdict([check("named GGUFs missing or not passed", len(bad), 0)], named=named)

    return _Step(rel, "modelfile", role, named, {"from": {"text": text}, "settings": {}}, len(text), write, gate)
