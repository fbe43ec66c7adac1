"""The comparison's three files in the run: report.json (every number), report.md (tables), report.png (bars).

Each is written atomically and recorded in the manifest as kind ``eval-report``; so is the
generations cache beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

from exar.rundir import Run

# Panels of report.png: (metric key or a special name, title).
PLOT_PANELS = (
    ("auroc", "validator AUROC vs the answer's log-prob (0.5 = chance)"),
    ("reliability", "reliability: accuracy per p(CORRECT) bin"),
    ("risk_coverage", "loop: error rate vs share answered"),
    ("em_squad", "exact match (SQuAD)"),
    ("token_f1", "token F1"),
    ("rougeL_f", "ROUGE-L F"),
    ("bertscore_f", "BERTScore F1"),
    ("nll", "NLL / token (lower is better)"),
    ("kl", "KL vs reference (lower is better)"),
    ("loop_bertscore_f", "loop BERTScore F1"),
    ("accepted_first", "accepted at first try"),
    ("answer_ms", "answer latency ms"),
    ("bytes", "model size MiB"),
)
_MIB = 2**20


def write_report(run: Run, folder: str, report: dict, made_from: list[str] = ()) -> None:
    from exar.eval.generations import GENERATIONS, TEACHER

    made_from = list(made_from)
    with run.writing(f"{folder}/report.json", "eval-report", made_from=made_from) as tmp:
        tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    with run.writing(f"{folder}/report.md", "eval-report", made_from=made_from) as tmp:
        tmp.write_text(render_markdown(report), encoding="utf-8")
    with run.writing(f"{folder}/report.png", "eval-report", made_from=made_from) as tmp:
        plot(report, tmp)
    for cache in (GENERATIONS, TEACHER):
        run.record(f"{folder}/{cache}", "eval-report", made_from=made_from)


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def _digits(key: str) -> int:
    return 1 if key.endswith("_ms") or key == "bleu" or key.startswith("loop_bleu") else 3


def _cell(entry: dict, key: str) -> str:
    digits = _digits(key)
    text = _fmt(entry["mean"][key], digits)
    diff = entry["differences"].get(key)
    if diff is not None:
        text += f" ({diff['diff']:+.{digits}f} [{diff['low']:+.{digits}f}, {diff['high']:+.{digits}f}]"
        text += "*)" if diff["significant"] else ")"
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_markdown(report: dict) -> str:
    variants = report["variants"]
    names = [v["name"] for v in variants]
    settings, bert = report["settings"], report["bertscore"]
    lines = [
        f"# exar-eval: {', '.join(names)} on {report['test']['questions']} held-out questions",
        "",
        f"Questions: `{report['test']['source']}` in `{report['run']}`. Reference variant: **{names[0]}**. "
        f"Cells: mean (difference against {names[0]} [{settings['confidence']:.0%} paired bootstrap interval, "
        f"{settings['resamples']} resamples, seed {settings['seed']}]; * = the interval excludes 0).",
        f"BERTScore: {bert['model']}, layer {bert['num_layers']}, idf {bert['idf']}, "
        f"rescaled {bert['rescale_with_baseline']}, bert-score {bert['bert_score_version']}.",
        f"Decoding: temperature {settings['loop']['temperature']} (0 = greedy), "
        f"max {settings['loop']['max_new_tokens']} new tokens; loop rounds {settings['loop']['max_rounds']}, "
        f"validator threshold {settings['loop']['threshold']}.",
        "",
    ]
    if report["sentences"]:
        lines += ["## Verdict", ""] + [f"- {s}" for s in report["sentences"]] + [""]
    lines += ["## Does the model know when it is wrong?", ""] + [f"- {s}" for s in report["metacognition_sentences"]] + [""]
    by_key = {m["key"]: m for m in report["metrics"]}
    sections = [("Answers (stage-zero)", [k for k in by_key if not k.startswith("loop_") and k not in
                                          ("accepted_first", "abstain", "rounds")])]
    if report["what"] != "answer":
        sections.append(("Pipeline (the EXAR loop)", [k for k in by_key if k.startswith("loop_") or k in
                                                      ("accepted_first", "abstain", "rounds")]))
    for title, keys in sections:
        rows = [[by_key[k]["label"]] + [_cell(v, k) for v in variants] for k in keys]
        lines += [f"## {title}", ""] + _table(["metric"] + names, rows) + [""]
    if report["what"] != "answer":
        rows = []
        for v in variants:
            p = v["pipeline"]
            gain = p["loop_vs_stage_zero"]
            rows.append([v["name"], ", ".join(f"{k} {n}" for k, n in sorted(p["decisions"].items())),
                         _fmt(p["accepted_first"]), _fmt(p["mean_rounds"], 2), str(p["abstentions"]),
                         f"{gain['diff']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]"])
        lines += _table(["variant", "decisions", "accepted first", "mean rounds", "abstentions",
                         "BERTScore F1 loop - stage-zero"], rows) + [""]
    lines += _metacognition_markdown(variants, settings, report["what"] != "answer")
    rows = [[v["name"], _fmt(v["bytes"] / _MIB, 2), _fmt(v["perplexity"]), _fmt(v["latency"]["answer_ms_mean"], 1),
             _fmt(v["latency"]["tokens_per_s"], 1), _fmt(v["corpus_bleu"], 2), _runtime(v["runtime"])]
            for v in variants]
    lines += ["", "## Size, speed, perplexity", "", settings["kl"] + ".", ""]
    lines += _table(["variant", "MiB", "perplexity", "answer ms", "tokens/s", "corpus BLEU", "runtime"], rows)
    return "\n".join(lines) + "\n"


def _ci(figure: dict, signed: bool = False) -> str:
    if figure["value"] is None:
        return "n/a"
    sign = "+" if signed else ""
    if figure["low"] is None:
        return f"{figure['value']:{sign}.3f}"
    return f"{figure['value']:{sign}.3f} [{figure['low']:{sign}.3f}, {figure['high']:{sign}.3f}]"


def _metacognition_markdown(variants: list[dict], settings: dict, loop: bool) -> list[str]:
    """The two tables that say whether the model knows when it is wrong, and how to read them."""
    lines = ["## Does the validator know? (stage-zero answers to the held-out questions)", "",
             settings["validator_labels"] + ". Every cell: value [95% bootstrap interval over questions]. "
             "AUROC: the chance that a right answer gets a higher p(CORRECT) than a wrong one (0.5 = chance, "
             "1 = perfect ranking); AUPRC: the same for finding the right answers (chance = the share right); "
             "Brier and ECE: how far p(CORRECT) is from the observed accuracy (0 = calibrated); the last four "
             "columns are at the loop's threshold. Free baselines on the same answers: the answer model's own "
             "mean token log-probability (`logprob`), and accepting every answer (AUROC 0.5).", ""]
    rows = []
    for v in variants:
        m = v["metacognition"]
        f = m["figures"]
        rows.append([v["name"], f"{m['right']}/{m['n']}", _ci(f["auroc"]), _ci(f["auprc"]), _ci(f["brier"]), _ci(f["ece"]),
                     _ci(f["logprob_auroc"]), _ci(f["auroc_minus_logprob"], signed=True),
                     _fmt(m["threshold"]) + (" (degenerate)" if m["degenerate_threshold"] else ""),
                     _ci(f["acceptance_rate"]), _ci(f["balanced_accuracy"]), _ci(f["precision"]), _ci(f["recall"])])
    lines += _table(["variant", "right", "AUROC", "AUPRC", "Brier", "ECE", "logprob AUROC", "AUROC - logprob",
                     "threshold", "accepted", "balanced acc.", "precision", "recall"], rows) + [""]
    if not loop:
        return lines
    lines += ["## The loop: what it changed, and what abstaining on the least trusted answers buys", "",
              "Final answers ranked by their p(CORRECT); AURC: the mean error rate over every coverage "
              "(answer the k most trusted of n, k = 1..n; lower is better; always accepting gives the plain error "
              "rate); accuracy at a coverage: over the answers the loop trusts most. Transitions compare each "
              "question's stage-zero answer with the loop's final one.", ""]
    rows = []
    for v in variants:
        m = v["metacognition"]
        f, t = m["figures"], m["transitions"]
        rounds = ", ".join(f"{r['accepted']}/{r['reached']}" for r in m["per_round"])
        rows.append([v["name"], _ci(f["stage_zero_accuracy"]), _ci(f["loop_accuracy"]), _ci(f["aurc"]),
                     _ci(f["logprob_aurc"]), _ci(f["always_accept_aurc"]), _ci(f["accuracy_at_0.5"]),
                     _ci(f["accuracy_at_0.7"]), _ci(f["accuracy_at_0.9"]),
                     f"{t['right_right']} / {t['right_wrong']} / {t['wrong_right']} / {t['wrong_wrong']}",
                     f"{t['net']:+d}", rounds])
    lines += _table(["variant", "stage-zero acc.", "loop acc.", "AURC", "AURC logprob", "AURC always accept",
                     "acc. @50%", "acc. @70%", "acc. @90%", "right->right / right->wrong / wrong->right / wrong->wrong",
                     "net", "accepted per round"], rows) + [""]
    return lines


def _runtime(runtime: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in runtime.items() if v is not None)


def plot(report: dict, path: Path) -> None:
    """Per-metric bars per variant with the interval of the difference drawn around the variant's mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = report["variants"]
    names = [v["name"] for v in variants]
    panels = [(key, title) for key, title in PLOT_PANELS
              if key == "bytes" or key in variants[0]["mean"] or _has_panel(key, variants[0])]
    columns = 4
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes.flat, panels):
        if key in _SPECIAL_PANELS:
            _SPECIAL_PANELS[key](ax, variants, colors)
            ax.set_title(title, fontsize=10)
            continue
        if key == "bytes":
            values = [v["bytes"] / _MIB for v in variants]
            errors = None
        else:
            values = [v["mean"][key] for v in variants]
            ref = values[0]
            low = [0.0] + [values[i] - (ref + v["differences"][key]["low"]) for i, v in enumerate(variants) if i]
            high = [0.0] + [(ref + v["differences"][key]["high"]) - values[i] for i, v in enumerate(variants) if i]
            errors = [[max(x, 0.0) for x in low], [max(x, 0.0) for x in high]]
        ax.bar(range(len(names)), values, yerr=errors, capsize=4,
               color=[colors[i % len(colors)] for i in range(len(names))])
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{report['test']['questions']} held-out questions; bars: mean; whiskers: "
                 f"{report['settings']['confidence']:.0%} paired-bootstrap interval of the difference "
                 f"against {names[0]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def _has_panel(key: str, variant: dict) -> bool:
    return key in ("auroc", "reliability") or (key == "risk_coverage" and "risk_coverage" in variant["metacognition"])


def _auroc_panel(ax, variants, colors) -> None:
    """Validator AUROC and the log-probability baseline's, side by side per variant, with intervals."""
    width = 0.38
    for offset, key, label, hatch in ((-width / 2, "auroc", "validator", None),
                                      (width / 2, "logprob_auroc", "answer log-prob", "//")):
        figures = [v["metacognition"]["figures"][key] for v in variants]
        values = [f["value"] if f["value"] is not None else 0.0 for f in figures]
        errors = [[max(val - (f["low"] if f["low"] is not None else val), 0.0) for val, f in zip(values, figures)],
                  [max((f["high"] if f["high"] is not None else val) - val, 0.0) for val, f in zip(values, figures)]]
        ax.bar([i + offset for i in range(len(variants))], values, width, yerr=errors, capsize=3, label=label,
               color=[colors[i % len(colors)] for i in range(len(variants))], hatch=hatch, edgecolor="black",
               linewidth=0.5)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_ylim(0, 1)
    ax.set_xticks(range(len(variants)), [v["name"] for v in variants], rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")


def _reliability_panel(ax, variants, colors) -> None:
    """Accuracy against mean p(CORRECT) per bin (bins holding answers), the diagonal = calibrated."""
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    for i, v in enumerate(variants):
        bins = [b for b in v["metacognition"]["reliability"] if b["n"]]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", markersize=3,
                color=colors[i % len(colors)], label=v["name"])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean p(CORRECT)", fontsize=8)
    ax.set_ylabel("share right", fontsize=8)
    ax.legend(fontsize=7)


def _risk_coverage_panel(ax, variants, colors) -> None:
    """Each variant's risk-coverage curve by p(CORRECT); dashed: the reference's by answer log-prob."""
    for i, v in enumerate(variants):
        curve = v["metacognition"]["risk_coverage"]["validator"]
        ax.plot(curve["coverage"], curve["risk"], color=colors[i % len(colors)], label=v["name"], linewidth=1.2)
    reference = variants[0]["metacognition"]["risk_coverage"]["logprob"]
    ax.plot(reference["coverage"], reference["risk"], color=colors[0], linestyle="--", linewidth=1,
            label=f"{variants[0]['name']} by log-prob")
    ax.axhline(1 - variants[0]["metacognition"]["figures"]["loop_accuracy"]["value"], color="grey", linestyle=":",
               linewidth=1, label="always accept")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("share of questions answered", fontsize=8)
    ax.set_ylabel("error rate among them", fontsize=8)
    ax.legend(fontsize=7)


_SPECIAL_PANELS = {"auroc": _auroc_panel, "reliability": _reliability_panel, "risk_coverage": _risk_coverage_panel}
