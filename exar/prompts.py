"""The EXAR prompts, rendered in ONE place for training, export checks, the edge loop and eval.

The paper's code rendered train and inference prompts differently and cut answers at the first
``#``; every prompt exar feeds a model comes from this module, so that cannot happen here.

Two layouts carry the same three fields (context, instruction, input):

- ``plain`` (default, the paper's)::

    ### Context:
    <context>
    ### Instruction:
    <instruction>
    ### Input:
    <input>

    ### Response:
    <target>

- ``chat``: the same fields, as the plain text above without its Response header, sent as one
  user message through the base model's own chat template (jinja, rendered here with jinja2 so
  the edge needs no transformers).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from exar.errors import ExarError

LAYOUTS = ("plain", "chat")

# The paper's role instructions, word for word.
INSTRUCTIONS: Mapping[str, str] = {
    "answer": "Generate a response to the question given in Input.",
    "validator": (
        "Validate the response given in Input with CORRECT or WRONG, "
        "considering the question given in Context."
    ),
    "exar": (
        "Generate a Response to the question given in Input. "
        "Response must be different from Context."
    ),
}

CORRECT, WRONG = "CORRECT", "WRONG"
LABELS = (CORRECT, WRONG)

MARKERS = ("### Context:", "### Instruction:", "### Input:", "### Response:")
_MARKER_RUN = re.compile(r"#{3,}")


@dataclass(frozen=True)
class Fields:
    """What a role puts in the three slots of the layout."""

    context: str
    instruction: str
    input: str


@dataclass(frozen=True)
class PromptStyle:
    """How prompts are laid out for one base model; recorded in run.json, rebuilt at the edge."""

    layout: str = "plain"
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    add_bos: bool = True  # whether the tokenizer puts BOS in front by itself
    special_tokens: tuple[str, ...] = ()
    instructions: Mapping[str, str] = field(default_factory=lambda: dict(INSTRUCTIONS))

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ExarError(f"unknown prompt layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        if self.layout == "chat" and not self.chat_template:
            raise ExarError("prompt layout 'chat' needs the base model's chat template, and it has none")

    def to_dict(self) -> dict:
        return {
            "layout": self.layout,
            "chat_template": self.chat_template,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos": self.add_bos,
            "special_tokens": list(self.special_tokens),
            "instructions": dict(self.instructions),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "PromptStyle":
        return cls(
            layout=data.get("layout", "plain"),
            chat_template=data.get("chat_template"),
            bos_token=data.get("bos_token") or "",
            eos_token=data.get("eos_token") or "",
            add_bos=data.get("add_bos", True),
            special_tokens=tuple(data.get("special_tokens") or ()),
            instructions={**INSTRUCTIONS, **(data.get("instructions") or {})},
        )

    def stop_strings(self) -> list[str]:
        """Where generated text ends: the layout's markers, EOS, and the template's end of turn."""
        stops = list(MARKERS)
        if self.eos_token:
            stops.append(self.eos_token)
        if self.layout == "chat":
            end_of_turn = _chat_end_of_turn(self)
            if end_of_turn and end_of_turn not in stops:
                stops.append(end_of_turn)
        return stops


PLAIN = PromptStyle()


def neutralize(text: str, style: PromptStyle = PLAIN) -> str:
    """Make user text unable to open a section of the layout or close the chat turn.

    Runs of three or more ``#`` become ``##`` (so ``### Response:`` cannot appear, while ``C#``
    and ``##`` survive) and the tokenizer's special-token strings are removed. Training data and
    edge questions go through this same rule.
    """
    text = _MARKER_RUN.sub("##", text)
    for token in style.special_tokens:
        if token:
            text = text.replace(token, "")
    return text


def role_fields(
    role: str,
    question: str,
    *,
    context: str = "",
    candidate: str = "",
    rejected: Sequence[str] = (),
    style: PromptStyle = PLAIN,
) -> Fields:
    """The three slots for a role, as EXAR_METHOD.md defines them.

    A context passage (the question's own, or retrieved from the user's documents) reaches every
    role: the answer role's Context slot; ahead of the question in the validator's Context slot;
    ahead of the question in the exar role's Input (its Context holds the rejected answers, which
    its instruction says to differ from). Without one, every prompt is the paper's.
    """
    clean = lambda s: neutralize(s.strip(), style)  # noqa: E731
    with_passage = (lambda text: f"{clean(context)}\n\n{clean(text)}") if context.strip() else clean
    if role == "answer":
        return Fields(clean(context), style.instructions["answer"], clean(question))
    if role == "validator":
        return Fields(with_passage(question), style.instructions["validator"], clean(candidate))
    if role == "exar":
        rejected_text = "\n".join(clean(r) for r in rejected if r.strip())
        return Fields(rejected_text, style.instructions["exar"], with_passage(question))
    raise ExarError(f"unknown role {role!r}; roles are answer, validator, exar")


def render_prompt(fields: Fields, style: PromptStyle = PLAIN) -> str:
    """The text a model continues; ends where the answer starts."""
    body = _plain_body(fields)
    if style.layout == "plain":
        return body + "\n\n### Response:\n"
    text = _render_chat(style, [{"role": "user", "content": body}], add_generation_prompt=True)
    return _strip_bos(text, style)


def render_completion(fields: Fields, target: str, style: PromptStyle = PLAIN) -> str:
    """What training teaches the model to write after ``render_prompt``: the target and its end."""
    target = target.strip()
    if style.layout == "plain":
        return target + style.eos_token
    prompt = render_prompt(fields, style)
    messages = [{"role": "user", "content": _plain_body(fields)}, {"role": "assistant", "content": target}]
    full = _strip_bos(_render_chat(style, messages, add_generation_prompt=False), style)
    if not full.startswith(prompt):
        raise ExarError("the chat template renders the assistant turn in a way exar cannot split from the prompt")
    return full[len(prompt):]


def render_answer(question: str, context: str = "", style: PromptStyle = PLAIN) -> str:
    return render_prompt(role_fields("answer", question, context=context, style=style), style)


def render_validator(question: str, candidate: str, style: PromptStyle = PLAIN, context: str = "") -> str:
    return render_prompt(role_fields("validator", question, context=context, candidate=candidate, style=style), style)


def render_exar(question: str, rejected: Sequence[str] = (), style: PromptStyle = PLAIN, context: str = "") -> str:
    return render_prompt(role_fields("exar", question, context=context, rejected=rejected, style=style), style)


def parse_answer(generated: str, style: PromptStyle = PLAIN) -> str:
    """The answer inside generated text: cut at the earliest stop string, never at a bare ``#``."""
    cut = len(generated)
    for stop in style.stop_strings():
        at = generated.find(stop)
        if at != -1:
            cut = min(cut, at)
    return generated[:cut].strip()


def completion_ids(tokenize: Callable[[str], list[int]], prompt: str, completion: str) -> tuple[list[int], int]:
    """(ids of ``prompt + completion``, the index where the completion's ids start).

    The whole text is tokenized at once, as a model reads it; the completion starts where those ids
    part from the prompt's own ids (a token that merges the prompt's end with the completion's start
    belongs to the completion). The ONE rule training (the loss mask), label scoring and eval's
    teacher forcing all use.
    """
    prompt_ids = tokenize(prompt)
    ids = tokenize(prompt + completion)
    start = 0
    while start < min(len(ids), len(prompt_ids)) and ids[start] == prompt_ids[start]:
        start += 1
    return ids, start


@dataclass(frozen=True)
class LabelTokens:
    """What the validator is scored on after a prompt: the ids both verdicts continue (``context``,
    BOS included) and each label's own ids after them, as training taught them.

    p(CORRECT) compares the two labels' summed token log-probabilities (``p_correct_from_logprobs``).
    Tokens both labels share at the start are part of ``context`` (their terms would cancel), and the
    end marker both share (EOS, the end of the chat turn) is left out: it follows either label alike.
    With one token per label, one forward pass over ``context`` scores both.
    """

    context: tuple[int, ...]
    labels: Mapping[str, tuple[int, ...]]

    @property
    def single_token(self) -> bool:
        return all(len(ids) == 1 for ids in self.labels.values())


def validator_completion(label: str, style: PromptStyle = PLAIN) -> str:
    """The text the validator is trained to write for ``label`` (e.g. ``"CORRECT</s>"`` or, in a
    Llama-2 chat template, ``" CORRECT </s>"``): ``render_completion`` of a validator turn."""
    if label not in LABELS:
        raise ExarError(f"unknown validator label {label!r}; labels are {', '.join(LABELS)}")
    return render_completion(role_fields("validator", "?", candidate="?", style=style), label, style)


def label_tokens(tokenize: Callable[[str], list[int]], prompt: str, style: PromptStyle = PLAIN) -> LabelTokens:
    """The token sequences each verdict continues ``prompt`` with, exactly as ``render_completion``
    rendered them for training; HF scoring, eval and the llama.cpp runtime all score these."""
    full = {label: completion_ids(tokenize, prompt, validator_completion(label, style))[0] for label in LABELS}
    a, b = full[CORRECT], full[WRONG]
    shortest = min(len(a), len(b))
    prefix = 0
    while prefix < shortest and a[prefix] == b[prefix]:
        prefix += 1
    if prefix == shortest:
        raise ExarError("the tokenizer gives the validator labels CORRECT and WRONG the same tokens")
    suffix = 0
    while suffix < shortest - prefix - 1 and a[-1 - suffix] == b[-1 - suffix]:
        suffix += 1
    return LabelTokens(tuple(a[:prefix]), {label: tuple(ids[prefix:len(ids) - suffix]) for label, ids in full.items()})


def p_correct_from_logprobs(logp_correct: float, logp_wrong: float) -> float:
    """p(CORRECT) = exp(l_C) / (exp(l_C) + exp(l_W)) over the labels' summed log-probabilities, without overflow."""
    margin = float(logp_correct) - float(logp_wrong)
    if margin >= 0:
        return 1.0 / (1.0 + math.exp(-margin))
    odds = math.exp(margin)
    return odds / (1.0 + odds)


def _plain_body(fields: Fields) -> str:
    return (
        f"### Context:\n{fields.context}\n"
        f"### Instruction:\n{fields.instruction}\n"
        f"### Input:\n{fields.input}"
    )


def _strip_bos(text: str, style: PromptStyle) -> str:
    """A tokenizer that adds BOS itself would give it twice after a template that writes it too."""
    if style.add_bos and style.bos_token and text.startswith(style.bos_token):
        return text[len(style.bos_token):]
    return text


def _chat_end_of_turn(style: PromptStyle) -> str:
    """The text a chat template writes right after an assistant message, e.g. ``<|im_end|>``."""
    sentinel = "\u2063EXAR\u2063"
    fields = Fields("", "", "")
    messages = [{"role": "user", "content": _plain_body(fields)}, {"role": "assistant", "content": sentinel}]
    full = _render_chat(style, messages, add_generation_prompt=False)
    after = full.split(sentinel, 1)[1] if sentinel in full else ""
    return after.strip()


def _render_chat(style: PromptStyle, messages: list[dict], add_generation_prompt: bool) -> str:
    template = _compiled_template(style.chat_template)
    return template.render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=style.bos_token,
        eos_token=style.eos_token,
    )


_TEMPLATES: dict[str, object] = {}


def _compiled_template(source: str | None):
    """Compile a chat template the way transformers does (sandboxed jinja2, trimmed blocks)."""
    if source is None:
        raise ExarError("prompt layout 'chat' needs the base model's chat template, and it has none")
    if source not in _TEMPLATES:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


# --- QA generation from documents (exar-train generate-qa) --------------------------------------
# The document's passage goes in the Context slot, the instruction below in the Instruction slot,
# and the Input slot stays empty; the same layouts (plain or the model's chat template) apply.

QA_GENERATION_INSTRUCTION = (
    "Write {n} questions about the text given in Context, each with its short answer copied from the text. "
    "Write each pair on two lines, like this:\nQ: <question>\nA: <answer>"
)


def render_qa_generation(passage: str, n: int, style: PromptStyle = PLAIN) -> str:
    """The prompt asking a model for ``n`` question/answer pairs about ``passage``."""
    fields = Fields(neutralize(passage.strip(), style), QA_GENERATION_INSTRUCTION.format(n=n), "")
    return render_prompt(fields, style)
