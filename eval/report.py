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
    ("em_squad", "exact match (SQuAD)"),
    ("token_f1", "token F1"),
    ("rougeL_f", "ROUGE-L F"),
    ("bertscore_f", "BERTScore F1"),
    ("validator_correct", "validator accuracy"),
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
    rows = [[v["name"]] + [_fmt(v["validator"][k]) for k in ("accuracy", "precision", "recall", "f1",
                                                              "balanced_accuracy")]
            + [str(v["validator"]["support"]["positive"]), str(v["validator"]["support"]["negative"])]
            for v in variants]
    lines += ["## Validator on the held-out answers", "", settings["validator_labels"] + ".", ""]
    lines += _table(["variant", "accuracy", "precision", "recall", "F1", "balanced acc.", "CORRECT", "WRONG"], rows)
    rows = [[v["name"], _fmt(v["bytes"] / _MIB, 2), _fmt(v["perplexity"]), _fmt(v["latency"]["answer_ms_mean"], 1),
             _fmt(v["latency"]["tokens_per_s"], 1), _fmt(v["corpus_bleu"], 2), _runtime(v["runtime"])]
            for v in variants]
    lines += ["", "## Size, speed, perplexity", "", settings["kl"] + ".", ""]
    lines += _table(["variant", "MiB", "perplexity", "answer ms", "tokens/s", "corpus BLEU", "runtime"], rows)
    return "\n".join(lines) + "\n"


def _runtime(runtime: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in runtime.items() if v is not None)


def plot(report: dict, path: Path) -> None:
    """Per-metric bars per variant with the interval of the difference drawn around the variant's mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = report["variants"]
    names = [v["name"] for v in variants]
    panels = [(key, title) for key, title in PLOT_PANELS if key == "bytes" or key in variants[0]["mean"]]
    columns = 4
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes.flat, panels):
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
