"""Ollama Modelfiles whose TEMPLATE is exar's own prompt layout, rendered by exar.prompts.

The Modelfile maps Ollama's system message to the layout's Context slot and the user message to
its Input slot, with the role's instruction fixed, so ``ollama run`` sends the model the prompt
it was trained on; the stop sequences are the layout's own.
"""

from __future__ import annotations

from exar.prompts import Fields, PromptStyle, render_prompt


def modelfile_text(role: str, model_file: str, style: PromptStyle, adapter_file: str | None = None) -> str:
    """A Modelfile for ``role``: FROM the GGUF (plus ADAPTER for base + LoRA), TEMPLATE, stops."""
    fields = Fields(context="{{ .System }}", instruction=style.instructions[role], input="{{ .Prompt }}")
    template = render_prompt(fields, style)
    lines = [f"FROM ./{model_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    lines.append(f'TEMPLATE """{template}"""')
    lines.extend(f'PARAMETER stop "{_quote(stop)}"' for stop in style.stop_strings())
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
