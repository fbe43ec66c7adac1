"""Training settings: one dataclass for the three roles, defaults from exar.constants."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from exar import constants as C
from exar.errors import ExarError

BITS_CHOICES = (4, 8, 16)
SCHEDULERS = ("cosine", "linear", "constant_with_warmup")
ALL_LINEAR = "all-linear"

# run.json section of each role's training settings ("answer" is the paper's stage-zero).
ROLE_SECTIONS = {"answer": "stage-zero", "validator": "validator", "exar": "exar"}


SPEED_ONLY = ("compile",)  # settings that change how fast a run trains, not what it trains


@dataclass(frozen=True)
class TrainSettings:
    """QLoRA / LoRA hyper-parameters shared by the three roles (litgpt-style: plain values).

    ``max_steps`` > 0 overrides ``epochs``. Validation losses are measured on the run's dev
    questions (``data/dev.jsonl``), which no adapter trains on.
    """

    bits: int = C.BITS
    lora_r: int = C.LORA_R
    lora_alpha: int = C.LORA_ALPHA
    lora_dropout: float = C.LORA_DROPOUT
    target_modules: tuple[str, ...] | str = C.LORA_TARGETS
    max_steps: int = -1
    epochs: float = C.EPOCHS
    batch_size: int = C.BATCH_SIZE
    grad_accum: int = C.GRAD_ACCUM
    lr: float = C.LEARNING_RATE
    warmup_ratio: float = C.WARMUP_RATIO
    scheduler: str = C.LR_SCHEDULER
    max_seq_len: int = C.MAX_SEQ_LEN
    packing: bool = False
    gradient_checkpointing: bool = True
    save_steps: int = C.SAVE_STEPS
    validation_loss: bool = True   # measure the loss on the dev questions' rows after training
    seed: int = C.SEED
    compile: bool = False          # GPU, 4-bit: torch.compile each decoder layer (speed only, same training)

    def __post_init__(self):
        if self.bits not in BITS_CHOICES:
            raise ExarError(f"--bits must be one of {', '.join(map(str, BITS_CHOICES))}, got {self.bits}")
        if self.scheduler not in SCHEDULERS:
            raise ExarError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        for name in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "max_seq_len", "save_steps"):
            if getattr(self, name) < 1:
                raise ExarError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ExarError("give --max-steps > 0 or --epochs > 0")
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            object.__setattr__(self, "target_modules", parse_targets(self.target_modules))

    def to_dict(self) -> dict:
        values = asdict(self)
        values["target_modules"] = (
            self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        )
        return values

    def identity(self) -> dict:
        """The settings that decide what is trained: a checkpoint resumes only under the same ones.
        ``compile`` changes the speed alone, so it may differ between an interrupted run and its resume."""
        return {k: v for k, v in self.to_dict().items() if k not in SPEED_ONLY}

    def with_(self, **changes) -> "TrainSettings":
        return replace(self, **changes)


def parse_targets(text: str) -> tuple[str, ...] | str:
    """``q_proj,v_proj`` -> ("q_proj", "v_proj"); ``all-linear`` stays as peft's keyword."""
    if text.strip() == ALL_LINEAR:
        return ALL_LINEAR
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise ExarError("--target-modules is empty; give a comma list such as q_proj,v_proj or all-linear")
    return names
