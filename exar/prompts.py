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
    """The three slots for a role, as EXAR_METHOD.md defines them."""
    clean = lambda s: neutralize(s.strip(), style)  # noqa: E731
    if role == "answer":
        return Fields(clean(context), style.instructions["answer"], clean(question))
    if role == "validator":
        return Fields(clean(question), style.instructions["validator"], clean(candidate))
    if role == "exar":
        rejected_text = "\n".join(clean(r) for r in rejected if r.strip())
        return Fields(rejected_text, style.instructions["exar"], clean(question))
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


def render_validator(question: str, candidate: str, style: PromptStyle = PLAIN) -> str:
    return render_prompt(role_fields("validator", question, candidate=candidate, style=style), style)


def render_exar(question: str, rejected: Sequence[str] = (), style: PromptStyle = PLAIN) -> str:
    return render_prompt(role_fields("exar", question, rejected=rejected, style=style), style)


def parse_answer(generated: str, style: PromptStyle = PLAIN) -> str:
    """The answer inside generated text: cut at the earliest stop string, never at a bare ``#``."""
    cut = len(generated)
    for stop in style.stop_strings():
        at = generated.find(stop)
        if at != -1:
            cut = min(cut, at)
    return generated[:cut].strip()


def label_token_ids(tokenize: Callable[[str], list[int]], prompt: str) -> dict[str, int]:
    """The first token of each validator label as it continues ``prompt``.

    Tokenized in context (prompt + label against prompt alone), because a label's first token
    can differ from the label tokenized on its own. HF and llama.cpp backends both use this.
    """
    prompt_ids = tokenize(prompt)
    firsts = {}
    for label in LABELS:
        ids = tokenize(prompt + label)
        shared = 0
        while shared < min(len(ids), len(prompt_ids)) and ids[shared] == prompt_ids[shared]:
            shared += 1
        if shared >= len(ids):
            raise ExarError(f"the tokenizer gives no token for the label {label!r}")
        firsts[label] = ids[shared]
    if firsts[CORRECT] == firsts[WRONG]:
        raise ExarError("the validator labels CORRECT and WRONG start with the same token in this tokenizer")
    return firsts


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
