"""Fault injection: every stage killed with SIGKILL at several points, rerun, and checked.

The chain is the real CLI on the real stories260K (../shared), 4-bit on the CPU:

    exar-train stage-zero -> predict -> annotate -> validator -> exar -> exar-export

For each stage, an uninterrupted run from the state the previous stage left is the reference
(its wall time T). Then, for each kill point f, a fresh copy of that state runs the stage, gets
SIGKILL after f x T seconds, and the same command runs again. A run is *recovered* when the
rerun exits 0 and the run is whole and consistent:

- every manifest entry's bytes hash to the recorded sha256, nothing is stale (``Run.stale``);
- no temporary (``*.exar-tmp-*``) is left anywhere and no final-named file is partial (right
  after the kill too: each JSONL parses, each GGUF reads, each adapter's safetensors loads);
- nothing is lost: the same artifacts are recorded as in the reference, the JSONL files hold as
  many rows, and the deterministic ones (data, DATASET+, GGUFs) are byte-identical to it.

Prints each trial, then "runs recovered / runs tried".

    python bench/faults.py                          # 6 stages x 4 kill points, ~17 min on 2 cores
    python bench/faults.py --points 0.5 --stages predict,export
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BASE = SHARED / "models" / "stories260K"
DATA = SHARED / "data" / "dolly" / "databricks-dolly-15k.head49.jsonl"
BIN = Path(sys.executable).parent
TRAIN = ["--max-steps", "6", "--save-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--max-seq-len", "192"]
STAGES = {
    "stage-zero": ["exar-train", "stage-zero", "--base", str(BASE), "--data", str(DATA), "--limit", "30", *TRAIN],
    "predict": ["exar-train", "predict", "--predict-limit", "10", "--predict-batch-size", "2",
                "--max-new-tokens", "16", "--temperature", "0.6", "--temperature", "0.8"],
    "annotate": ["exar-train", "annotate"],
    "validator": ["exar-train", "validator", *TRAIN],
    "exar": ["exar-train", "exar", *TRAIN],
    "export": ["exar-export", "--mode", "adapters", "--quant", "q8_0", "--threads", "1"],
}
DETERMINISTIC = (".jsonl", ".gguf")  # adapters resumed from a checkpoint agree to 1e-6, not bit for bit
TMP_TAG = ".exar-tmp-"


def run_stage(stage: str, run: Path, kill_after: float | None = None) -> tuple[int | None, float]:
    """Run one stage on ``run``; with ``kill_after``, SIGKILL it then. Returns (exit code or None, seconds)."""
    argv = [str(BIN / STAGES[stage][0]), *STAGES[stage][1:], "--run", str(run)]
    env = {**os.environ, "EXAR_MODELS": str(run.parent), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        _, err = child.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return None, time.perf_counter() - start
    if child.returncode != 0:
        print(f"    {stage} exited {child.returncode}: {err.strip().splitlines()[-1:]}", file=sys.stderr)
    return child.returncode, time.perf_counter() - start


def partial_files(run: Path) -> list[str]:
    """Final-named files that are not whole (a JSONL line cut short, an unreadable GGUF or safetensors)."""
    from gguf import GGUFReader
    from safetensors import safe_open

    bad = []
    for path in run.rglob("*"):
        if not path.is_file() or TMP_TAG in str(path) or "checkpoints" in path.parts:
            continue
        try:
            if path.suffix == ".jsonl" and not path.name.endswith(".partial"):
                [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".gguf":
                GGUFReader(str(path))
            elif path.suffix == ".safetensors":
                with safe_open(str(path), "pt") as f:
                    [f.get_tensor(k) for k in f.keys()]
        except Exception as e:  # any reader's failure is a partial file
            bad.append(f"{path.relative_to(run)} ({type(e).__name__})")
    return bad


def check(run: Path, reference: Path) -> list[str]:
    """What is wrong with ``run`` after its rerun, compared with the uninterrupted ``reference``."""
    from exar.rundir import Run

    problems = []
    r, ref = Run(run), Run(reference)
    for entry in r.artifacts:
        try:
            r.verify(entry["path"])
        except Exception as e:
            problems.append(str(e))
    if r.stale():
        problems.append(f"stale: {r.stale()}")
    leftovers = [str(p.relative_to(run)) for p in run.rglob(f"*{TMP_TAG}*")]
    if leftovers:
        problems.append(f"temporaries left: {leftovers}")
    problems += [f"partial: {p}" for p in partial_files(run)]
    got = {e["path"]: e for e in r.artifacts}
    want = {e["path"]: e for e in ref.artifacts}
    if set(got) != set(want):
        problems.append(f"artifacts differ: missing {sorted(set(want) - set(got))}, extra {sorted(set(got) - set(want))}")
    for rel in set(got) & set(want):
        if rel.endswith(".jsonl") and len(r.path(rel).read_text().splitlines()) != len(ref.path(rel).read_text().splitlines()):
            problems.append(f"{rel}: other row count than the reference")
        elif rel.endswith(DETERMINISTIC) and got[rel]["sha256"] != want[rel]["sha256"] and not rel.startswith("logs/"):
            problems.append(f"{rel}: other bytes than the reference")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default="0.3,0.5,0.7,0.9", help="kill points, as fractions of the stage's time")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if not (BASE / "model.safetensors").is_file() or not DATA.is_file():
        sys.exit(f"needs {BASE} and {DATA} (../shared)")
    points = [float(p) for p in args.points.split(",")]
    chosen = args.stages.split(",")
    work = Path(tempfile.mkdtemp(prefix="exar-faults-"))
    state = work / "state" / "run"  # the run as the previous stage left it
    state.parent.mkdir()
    trials, started = [], time.perf_counter()
    last = max(list(STAGES).index(stage) for stage in chosen)
    for stage in list(STAGES)[:last + 1]:
        reference = work / f"reference-{stage}" / "run"
        reference.parent.mkdir()
        if state.exists():
            shutil.copytree(state, reference, symlinks=True)
        code, seconds = run_stage(stage, reference)
        if code != 0:
            sys.exit(f"the uninterrupted {stage} failed; nothing to compare with")
        print(f"{stage}: uninterrupted {seconds:.1f} s", flush=True)
        if stage in chosen:
            for point in points:
                trial = work / f"{stage}-{point}" / "run"
                trial.parent.mkdir()
                if state.exists():
                    shutil.copytree(state, trial, symlinks=True)
                code, _ = run_stage(stage, trial, kill_after=point * seconds)
                killed = code is None
                partial = partial_files(trial) if trial.exists() else []
                rerun, _ = run_stage(stage, trial)
                problems = [f"partial right after the kill: {p}" for p in partial]
                problems += [f"rerun exited {rerun}"] if rerun != 0 else check(trial, reference)
                trials.append({"stage": stage, "point": point, "killed": killed, "recovered": not problems,
                               "problems": problems})
                print(f"  kill at {point:.0%} of {seconds:.1f} s: {'killed' if killed else 'finished first'}, "
                      f"{'recovered' if not problems else 'NOT recovered: ' + '; '.join(problems)}", flush=True)
                shutil.rmtree(trial.parent)
        shutil.rmtree(state, ignore_errors=True)
        shutil.copytree(reference, state, symlinks=True)
    killed = [t for t in trials if t["killed"]]
    recovered = sum(t["recovered"] for t in trials)
    print(f"runs recovered / runs tried: {recovered} / {len(trials)} "
          f"({len(killed)} killed mid-stage, {sum(t['recovered'] for t in killed)} of them recovered); "
          f"{time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "cores": os.cpu_count(), "points": points, "trials": trials,
            "recovered": recovered, "tried": len(trials)}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
