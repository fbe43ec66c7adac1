"""exar: three EXAR LoRA adapters from a cloud GPU to a laptop CPU.

The spine every stage shares lives here (prompts, run directory, data, base models, CLI);
the stages install as exar.train, exar.export, exar.edge and exar.eval.
"""

__version__ = "0.1.0"
