"""Reading a Llama HF folder without loading it: its shape, and its tensors one at a time.

Export never holds a whole model in memory: every converter walks ``TensorSource`` and loads
one tensor, writes it, and lets it go. This is what keeps a 7B export under a few GiB of RAM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from exar.basemodel import check_llama, read_config
from exar.errors import ExarError

# HF stores q/k rows per head as [first halves of the rotary pairs | second halves]; Meta's
# checkpoints and llama.cpp interleave the pairs. These two functions move between the two.


def interleave_qk(weight, n_heads: int):
    """HF (rotate-half) rows -> Meta / GGUF (interleaved) rows; works on any (rows, ...) array."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def deinterleave_qk(weight, n_heads: int):
    """Meta / GGUF (interleaved) rows -> HF (rotate-half) rows: the inverse of ``interleave_qk``."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


@dataclass(frozen=True)
class LlamaShape:
    """The hyper-parameters export needs, read from config.json (transformers 4 or 5 layout)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    context: int
    tied: bool

    @classmethod
    def read(cls, folder: Path | str) -> "LlamaShape":
        folder = Path(folder)
        config = read_config(folder)
        where = folder / "config.json"
        check_llama(config, where)
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
            rope_type = rope.get("rope_type") or rope.get("type") or "default"
            return cls(
                hidden=hidden,
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate=int(config["intermediate_size"]),
                vocab=int(config["vocab_size"]),
                norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                rope_scaling=None if rope_type == "default" else dict(rope, rope_type=rope_type),
                context=int(config.get("max_position_embeddings") or 2048),
                tied=bool(config.get("tie_word_embeddings", False)),
            )
        except KeyError as e:
            raise ExarError(f"{where}: missing field {e.args[0]}") from None

    @property
    def n_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * (attn + mlp + 2 * self.hidden) + embed + self.hidden

    def qk_heads(self, hf_name: str) -> int | None:
        """How many heads a tensor's rows are grouped in, if it is a q or k projection."""
        if hf_name.endswith("q_proj.weight"):
            return self.heads
        if hf_name.endswith("k_proj.weight"):
            return self.kv_heads
        return None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str      # safetensors dtype: F32, F16, BF16, ...
    shape: tuple[int, ...]
    start: int = 0  # byte offset of the data in the file

    @property
    def nbytes(self) -> int:
        size = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}.get(self.dtype, 4)
        count = 1
        for dim in self.shape:
            count *= dim
        return count * size


class TensorSource:
    """The tensors of an HF folder's safetensors shards, listed from their headers, loaded one by one."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ExarError(f"{self.folder}: no *.safetensors weights (export reads safetensors only)")
        self.infos: dict[str, TensorInfo] = {}
        for file in files:
            for name, (dtype, shape, start) in read_safetensors_header(file).items():
                self.infos[name] = TensorInfo(name, file, dtype, tuple(shape), start)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def names(self) -> list[str]:
        return list(self.infos)

    def load(self, name: str):
        """One tensor as a torch tensor (its stored dtype), read into its own buffer (no mmap kept resident)."""
        import torch

        info = self.infos[name]
        dtype = _TORCH_DTYPES.get(info.dtype)
        if dtype is None:
            raise ExarError(f"{info.file}: tensor {name} has dtype {info.dtype}, which export does not read")
        buffer = bytearray(info.nbytes)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            if f.readinto(buffer) != info.nbytes:
                raise ExarError(f"{info.file}: truncated inside tensor {name}")
        if not buffer:
            return torch.empty(info.shape, dtype=getattr(torch, dtype))
        return torch.frombuffer(buffer, dtype=getattr(torch, dtype)).reshape(info.shape)

    def by_file(self) -> dict[Path, list[str]]:
        files: dict[Path, list[str]] = {}
        for info in self.infos.values():
            files.setdefault(info.file, []).append(info.name)
        return files

    def iter_file(self, file: Path) -> Iterator[tuple[str, object]]:
        """The tensors of one shard, loaded one at a time."""
        for name in self.by_file()[file]:
            yield name, self.load(name)


_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I8": "int8", "U8": "uint8"}


def read_safetensors_header(file: Path) -> dict[str, tuple[str, list[int], int]]:
    """name -> (dtype, shape, absolute data offset) of a safetensors file, after checking the file is complete."""
    file = Path(file)
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a header")
            length = int.from_bytes(head, "little")
            if length <= 0 or 8 + length > size:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(f.read(length))
    except (ValueError, UnicodeDecodeError) as e:
        raise ExarError(f"{file}: not a valid safetensors file ({e})") from None
    header.pop("__metadata__", None)
    end = 0
    tensors = {}
    for name, meta in header.items():
        try:
            tensors[name] = (meta["dtype"], list(meta["shape"]), 8 + length + int(meta["data_offsets"][0]))
            end = max(end, int(meta["data_offsets"][1]))
        except (KeyError, TypeError, IndexError):
            raise ExarError(f"{file}: damaged header entry for tensor {name}") from None
    if 8 + length + end > size:
        raise ExarError(f"{file}: truncated ({size} bytes, the header needs {8 + length + end}); copy or download it again")
    return tensors


def copy_tokenizer_files(src: Path, dest: Path) -> None:
    """Tokenizer, chat template and generation settings of an HF folder, copied byte for byte."""
    import shutil

    for file in Path(src).iterdir():
        if file.is_file() and (file.name.startswith(("tokenizer", "special_tokens", "added_tokens", "vocab", "merges"))
                               or file.name in ("chat_template.jinja", "chat_template.json", "generation_config.json")):
            shutil.copy2(file, Path(dest) / file.name)
