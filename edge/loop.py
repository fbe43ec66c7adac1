"""The EXAR loop: answer -> validate -> re-answer with ALL rejected answers -> validate ...

One implementation for every backend (llama.cpp here, transformers in eval), so the loop that is
evaluated is the loop that ships. A backend only has to generate text for a role and give
p(CORRECT) for a validator prompt; nothing here imports llama_cpp or torch.

Round 1 asks the ``answer`` role (stage-zero) the question (+ optional context passage); rounds
2.. ask the ``exar`` role with every rejected answer in its context, so it cannot cycle A -> B -> A.
Every answer, the last re-answer included, is validated: p(CORRECT) compares the log-probabilities
of the two labels' token sequences as training taught them (``exar.prompts.label_tokens``; one
forward pass when each label is one token), against a threshold. A re-answer that equals a
rejected one after SQuAD normalization, or is empty, is not new: it is sampled again at a higher
temperature with another seed, within a budget; if it stays old, the round is recorded as not new
and not validated again. When nothing is accepted, ``on_reject`` picks the best-scored answer
(``best``) or no answer (``abstain``); the result says which.

``Result.to_dict()`` is the JSON of ``exar-edge ask --json`` and of each ``exar-edge batch`` row::

    {
      "question": str, "context": str,
      "answer": str | null,          # null when the loop abstains
      "decision": "accepted" | "best" | "abstain",
      "accepted": bool,              # the answer passed the validator
      "p_correct": float | null,     # of the returned answer
      "stage_zero_answer": str,      # round 1's answer (stage-zero alone, for comparison)
      "threshold": float, "on_reject": "best" | "abstain", "max_rounds": int,
      "rounds": [{"round": int, "role": "answer" | "exar", "answer": str,
                  "p_correct": float | null,  # null when the answer was not new (not re-validated)
                  "accepted": bool, "new": bool, "resamples": int,
                  "logprob": float | null,    # mean token log-probability of the answer (the free
                                              # confidence baseline; null for an empty answer)
                  "tokens": int,              # generated tokens, resamples included
                  "ms": float,                # generation + verdict
                  "verdict_ms": float}],
      "tokens": int, "total_ms": float       # all rounds; wall time of the whole loop
    }
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Mapping, Protocol

from exar import constants
from exar.errors import ExarError
from exar.metrics import answer_key
from exar.prompts import PromptStyle, render_answer, render_exar, render_validator

DECISIONS = ("accepted", "best", "abstain")


@dataclass
class Generation:
    """What a backend generated for one prompt: the parsed answer (``parse_answer``), its cost, and
    the mean log-probability of the generated tokens under the model's own (untempered)
    distribution, end-of-sequence excluded (None when nothing was generated)."""

    text: str
    tokens: int
    ms: float
    logprob: float | None = None


class Backend(Protocol):
    """What the loop needs from a model runtime (llama.cpp at the edge, transformers in eval)."""

    style: PromptStyle

    def generate(self, role: str, prompt: str, *, temperature: float, top_p: float, seed: int,
                 max_new_tokens: int) -> Generation:
        """Continue ``prompt`` with ``role``'s model; temperature 0 means greedy."""
        ...

    def p_correct(self, prompt: str) -> tuple[float, float]:
        """(p(CORRECT), ms) of the validator role after ``prompt``, scored on ``exar.prompts.label_tokens``."""
        ...

    def close(self) -> None:
        ...


@dataclass(frozen=True)
class LoopSettings:
    """How the loop runs; defaults from exar.constants, the threshold from the run when it has one."""

    max_rounds: int = constants.MAX_ROUNDS
    threshold: float = constants.VALIDATOR_THRESHOLD
    on_reject: str = "best"
    temperature: float = 0.0
    top_p: float = constants.PREDICT_TOP_P
    resample_budget: int = constants.RESAMPLE_BUDGET
    resample_temperature: float = constants.RESAMPLE_TEMPERATURE
    max_new_tokens: int = constants.MAX_NEW_TOKENS
    seed: int = constants.SEED

    def __post_init__(self):
        checks = (
            (self.max_rounds >= 1, f"max rounds must be >= 1, got {self.max_rounds}"),
            (0.0 <= self.threshold <= 1.0, f"threshold must be in [0, 1], got {self.threshold}"),
            (self.on_reject in constants.ON_REJECT,
             f"on-reject must be one of {', '.join(constants.ON_REJECT)}, got {self.on_reject!r}"),
            (self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top-p must be in (0, 1], got {self.top_p}"),
            (self.resample_budget >= 0, f"resample budget must be >= 0, got {self.resample_budget}"),
            (self.resample_temperature > 0.0,
             f"resample temperature must be > 0, got {self.resample_temperature}"),
            (self.max_new_tokens >= 1, f"max new tokens must be >= 1, got {self.max_new_tokens}"),
        )
        for ok, message in checks:
            if not ok:
                raise ExarError(message)

    @classmethod
    def for_run(cls, run_settings: Mapping, **overrides) -> "LoopSettings":
        """Settings for a run: its validator's calibrated threshold unless overridden; None = default."""
        threshold = (run_settings.get("validator") or {}).get("threshold")
        base = cls() if threshold is None else cls(threshold=float(threshold))
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class Round:
    round: int
    role: str
    answer: str
    p_correct: float | None
    accepted: bool
    new: bool
    resamples: int
    logprob: float | None
    tokens: int
    ms: float
    verdict_ms: float


@dataclass
class Result:
    question: str
    context: str
    answer: str | None
    decision: str
    accepted: bool
    p_correct: float | None
    stage_zero_answer: str
    threshold: float
    on_reject: str
    max_rounds: int
    rounds: list[Round] = field(default_factory=list)
    tokens: int = 0
    total_ms: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def run_loop(backend: Backend, question: str, *, context: str = "",
             settings: LoopSettings = LoopSettings()) -> Result:
    """Answer ``question`` with the EXAR loop on ``backend``; see the module docstring."""
    if not question.strip():
        raise ExarError("the question is empty")
    start = time.perf_counter()
    style = backend.style
    rejected: list[str] = []
    seen = {""}  # an empty answer is never new
    rounds: list[Round] = []
    for number in range(1, settings.max_rounds + 1):
        role = "answer" if number == 1 else "exar"
        prompt = (render_answer(question, context, style) if number == 1
                  else render_exar(question, rejected, style, context))
        generation, resamples, tokens, gen_ms = _new_answer(backend, role, prompt, number, seen, settings)
        key = answer_key(generation.text)
        is_new = key not in seen
        p, verdict_ms = (backend.p_correct(render_validator(question, generation.text, style, context))
                         if is_new else (None, 0.0))
        accepted = p is not None and p >= settings.threshold
        rounds.append(Round(number, role, generation.text, p, accepted, is_new, resamples, generation.logprob,
                            tokens, gen_ms + verdict_ms, verdict_ms))
        if accepted:
            break
        if is_new:
            seen.add(key)
            rejected.append(generation.text)
    return _decide(question, context, rounds, settings, start)


def _new_answer(backend: Backend, role: str, prompt: str, number: int, seen: set[str],
                settings: LoopSettings) -> tuple[Generation, int, int, float]:
    """Generate, then sample again (hotter, other seeds) while the answer repeats a rejected one."""
    tokens, ms = 0, 0.0
    for attempt in range(settings.resample_budget + 1):
        temperature = settings.temperature if attempt == 0 else max(settings.temperature,
                                                                    settings.resample_temperature)
        generation = backend.generate(
            role, prompt, temperature=temperature, top_p=settings.top_p,
            seed=settings.seed + 1000 * number + attempt, max_new_tokens=settings.max_new_tokens,
        )
        tokens += generation.tokens
        ms += generation.ms
        if answer_key(generation.text) not in seen:
            break
    return generation, attempt, tokens, ms


def _decide(question: str, context: str, rounds: list[Round], settings: LoopSettings,
            start: float) -> Result:
    """The loop's answer: the accepted one, else the best-scored one or none (``on_reject``)."""
    chosen = next((r for r in rounds if r.accepted), None)
    decision = "accepted"
    if chosen is None:
        scored = [r for r in rounds if r.p_correct is not None]
        if settings.on_reject == "best" and scored:
            chosen, decision = max(scored, key=lambda r: r.p_correct), "best"
        else:
            decision = "abstain"
    return Result(
        question=question,
        context=context,
        answer=chosen.answer if chosen else None,
        decision=decision,
        accepted=decision == "accepted",
        p_correct=chosen.p_correct if chosen else None,
        stage_zero_answer=rounds[0].answer,
        threshold=settings.threshold,
        on_reject=settings.on_reject,
        max_rounds=settings.max_rounds,
        rounds=rounds,
        tokens=sum(r.tokens for r in rounds),
        total_ms=(time.perf_counter() - start) * 1000.0,
    )
