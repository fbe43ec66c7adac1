"""The EXAR loop's backend over transformers: full precision, the reference every GGUF is measured against.

It implements the edge loop's ``Backend`` protocol (``generate``, ``p_correct``, ``close``), so
``exar-eval`` runs the very loop that ships, and ``hf`` differs from ``gguf:q4_0`` only in weights
and arithmetic. Three modes over a run:

- ``adapters`` (variant ``hf``): the fp32 base with the three PEFT adapters loaded once
  (``load_adapter``) and switched per call (``set_adapter``): one base in memory.
- ``merged`` (variant ``hf-merged``): the merged folders ``hf/<role>/`` that export writes, one
  model per role, computed in fp32 (the rounding to 16 bits is what the variant measures).
- ``base`` (variant ``base``): the vanilla base for every role, no adapters; p(CORRECT) then comes
  from the base model's own logits of the two label tokens.

``teacher_forced_logits`` gives the logits of every target position, for perplexity and KL.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Sequence

from exar.constants import ADAPTERS_DIR, ROLES
from exar.edge.loop import Generation
from exar.errors import ExarError
from exar.export.layout import hf_rel
from exar.prompts import PromptStyle
from exar.rundir import Run

HF_MODES = ("adapters", "merged", "base")


class _StopOnText:
    """Stop once the new text holds a stop string (parse_answer cuts there anyway).

    transformers' own ``stop_strings`` precomputes a table over the whole vocabulary at every
    generate call (1.5 s for SmolLM2's 49k tokens); decoding the few new tokens costs nothing.
    """

    def __init__(self, tokenizer, prompt_length: int, stops: Sequence[str]):
        self.tokenizer, self.prompt_length, self.stops = tokenizer, prompt_length, stops

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        text = self.tokenizer.decode(input_ids[0, self.prompt_length:])
        return torch.full((input_ids.shape[0],), any(s in text for s in self.stops), dtype=torch.bool)


class HFBackend:
    """A ``loop.Backend`` over transformers models, one per role (possibly the same object)."""

    def __init__(self, models: Mapping[str, object], tokenizer, style: PromptStyle, *, threads: int | None = None):
        missing = [role for role in ROLES if role not in models]
        if missing:
            raise ExarError(f"the transformers backend needs a model for every role; missing {', '.join(missing)}")
        self.models = dict(models)
        self.tokenizer = tokenizer
        self.style = style
        self._stops = style.stop_strings()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._restore_threads = None
        if threads is not None:
            import torch

            self._restore_threads = torch.get_num_threads()
            torch.set_num_threads(threads)

    def _model(self, role: str):
        """The model that plays ``role``, with its adapter switched on when it carries several."""
        model = self.models[role]
        if role in getattr(model, "peft_config", {}):
            model.set_adapter(role)
        return model

    def tokenize(self, text: str) -> list[int]:
        """Token ids as the model sees ``text`` (BOS when the tokenizer adds it, special tokens parsed)."""
        return self.tokenizer(text).input_ids

    def generate(self, role: str, prompt: str, *, temperature: float, top_p: float, seed: int,
                 max_new_tokens: int) -> Generation:
        import torch
        from transformers import GenerationConfig

        from exar.metrics import log_softmax
        from exar.prompts import parse_answer

        start = time.perf_counter()
        model = self._model(role)
        encoded = self.tokenizer(prompt, return_tensors="pt")
        sampling = temperature > 0
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=sampling, num_beams=1,
            temperature=temperature if sampling else None, top_p=top_p if sampling else None,
            top_k=0 if sampling else None,
            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
        )
        if sampling:
            torch.manual_seed(seed)
        stop = _StopOnText(self.tokenizer, encoded.input_ids.shape[1], self._stops)
        with torch.no_grad():
            output = model.generate(**encoded, generation_config=config, stopping_criteria=[stop],
                                    return_dict_in_generate=True, output_logits=True)
        new = output.sequences[0, encoded.input_ids.shape[1]:].tolist()
        if new and new[-1] == self.tokenizer.eos_token_id:
            new = new[:-1]
        logprobs = [float(log_softmax(step[0].float().numpy())[token]) for step, token in zip(output.logits, new)]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Generation(parse_answer(text, self.style), len(new), (time.perf_counter() - start) * 1000.0,
                          sum(logprobs) / len(logprobs) if logprobs else None)

    def p_correct(self, prompt: str) -> tuple[float, float]:
        from exar.train.scoring import p_correct_hf

        start = time.perf_counter()
        p = p_correct_hf(self._model("validator"), self.tokenizer, [prompt], self.style)[0]
        return p, (time.perf_counter() - start) * 1000.0

    def teacher_forced_logits(self, role: str, prompt_ids: Sequence[int], target_ids: Sequence[int]):
        """Logits predicting each of ``target_ids`` after ``prompt_ids`` and the targets before it
        (len(target_ids) x vocab, NumPy): the edge runtime's method of the same name, in transformers."""
        import torch

        ids = list(prompt_ids) + list(target_ids)
        with torch.no_grad():
            logits = self._model(role)(torch.tensor([ids])).logits[0, len(prompt_ids) - 1:len(ids) - 1]
        return logits.float().numpy()

    def close(self) -> None:
        """Drop the models and give torch back the thread count it had before."""
        self.models = {}
        if self._restore_threads is not None:
            import torch

            torch.set_num_threads(self._restore_threads)
            self._restore_threads = None


def open_hf_backend(run: Run, mode: str, *, threads: int | None = None) -> HFBackend:
    """The transformers backend of ``run`` in ``mode`` (adapters | merged | base), fp32 on the CPU.

    ``threads`` sets torch's CPU threads while the backend is open (torch's setting is
    process-wide): on a busy machine fewer threads than cores is much faster, as for llama.cpp.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if mode not in HF_MODES:
        raise ExarError(f"unknown transformers mode {mode!r}; choose one of {', '.join(HF_MODES)}")
    style = PromptStyle.from_dict(run.settings.get("prompt") or {})
    base_dir = base_folder(run)

    def load(folder: Path):
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()

    if mode == "merged":
        folders = {role: run.path(hf_rel(role)) for role in ROLES}
        models = {role: load(folder) for role, folder in folders.items()}
        return HFBackend(models, AutoTokenizer.from_pretrained(str(folders["answer"])), style, threads=threads)
    model = load(base_dir)
    if mode == "adapters":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(run.path(adapter_rel(ROLES[0]))), adapter_name=ROLES[0])
        for role in ROLES[1:]:
            model.load_adapter(str(run.path(adapter_rel(role))), adapter_name=role)
        model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    return HFBackend({role: model for role in ROLES}, tokenizer, style, threads=threads)


def adapter_rel(role: str) -> str:
    return f"{ADAPTERS_DIR}/{role}"


def base_folder(run: Run) -> Path:
    """The run's base model folder, as recorded in run.json."""
    base = run.settings.get("base") or {}
    path = base.get("path")
    if not path:
        raise ExarError(f"{run.settings_path}: no base model recorded (field 'base.path'); train the run first")
    if not Path(path).is_dir():
        raise ExarError(f"{run.settings_path}: base model folder {path} (field 'base.path') is missing")
    return Path(path)
