"""What an exar command may print on stderr by default: exar's own lines and progress bars.

Everything else (a library's warning, log line or progress bar) is "foreign": the quiet default
(exar.clikit.quiet_libraries) keeps it off the terminal unless --verbose or --debug.
"""

from __future__ import annotations

import re

# tqdm: "<desc>: 42%|####  | 21/50 [...]" or, without a description, " 42%|####  | 21/50 [...]"
_BAR = re.compile(r"^(?:(?P<desc>.*?): )?\s*\d+%\|[^|]*\|\s*\d+/\d+")
# exar's bars: exar.progress.bar's descriptions, and the trainer's step / evaluation bars (none)
_EXAR_BAR = re.compile(r"(predict|generate-qa|consolidated|merging \S+|\S+ -> GGUF \w+|answering"
                       r"|hf|hf-merged|base|gguf:\w+|adapters:\w+)")
# exar's lines: "<stage or role>: ...", the run it took, what export writes (and the disk it needs),
# timings, the edge's verdict line ("  [accepted ...]"), errors
_EXAR_LINE = re.compile(r"^(?:(?:data|answer|validator|exar|predict|annotate|generate-qa|run|export|disk|edge|eval)"
                        r": |using run |writing |unchanged: |  done in |  \[|error: )")


def foreign_lines(stderr: str) -> list[str]:
    """Lines of ``stderr`` that exar did not print (tqdm redraws split on carriage returns)."""
    foreign = []
    for line in re.split(r"[\r\n]", stderr.replace("\x1b[A", "")):
        if not line.strip():
            continue
        bar = _BAR.match(line)
        if bar:
            if bar.group("desc") is not None and not _EXAR_BAR.fullmatch(bar.group("desc").strip()):
                foreign.append(line)
        elif not _EXAR_LINE.match(line):
            foreign.append(line)
    return foreign
