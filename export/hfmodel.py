"""Reading a Llama-architecture HF folder without loading it: its shape, and its tensors one at a time.

Export never holds a whole model in memory: every converter walks ``TensorSource``, which opens
the safetensors shard with ``safe_open`` for each tensor, so a tensor's pages are mapped only
while that tensor is in use and the resident memory stays near the size of the largest tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from exar.basemodel import check_llama, read_config
from exar.errors import ExarError

INDEX = "model.safetensors.index.json"

# HF stores q/k rows per head as [first halves of the rotary pairs | second halves]; Meta's
# checkpoints and llama.cpp interleave the pairs. These two functions move between the two.


def interleave_qk(weight, n_heads: int):
    """HF (rotate-half) rows -> Meta / GGUF (interleaved) rows; works on any (rows, ...) array, biases too."""
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
    model_type: str = "llama"
    head_dim_in_config: bool = False   # llama.cpp's converter writes key/value_length only then
    sliding_window: int | None = None  # Mistral v0.1; llama.cpp's llama architecture attends to everything

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
                model_type=str(config.get("model_type") or "llama"),
                head_dim_in_config=config.get("head_dim") is not None,
                sliding_window=config.get("sliding_window"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ExarError(f"{where}: missing or bad field {e.args[0] if e.args else e}") from None

    @property
    def n_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * (attn + mlp + 2 * self.hidden) + embed + self.hidden

    def qk_heads(self, hf_name: str) -> int | None:
        """How many heads a tensor's rows are grouped in, if it is a q or k projection (weight or bias)."""
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return self.heads
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return self.kv_heads
        return None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str      # safetensors dtype: F32, F16, BF16, ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        size = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}.get(self.dtype, 4)
        count = 1
        for dim in self.shape:
            count *= dim
        return count * size


def safetensors_infos(file: Path) -> dict[str, TensorInfo]:
    """name -> TensorInfo of one safetensors file, read by ``safe_open`` (which refuses a truncated file)."""
    from safetensors import SafetensorError, safe_open

    file = Path(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            return {name: TensorInfo(name, file, f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape()))
                    for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ExarError(f"{file}: truncated or not a safetensors file ({e}); copy or download it again") from None


class TensorSource:
    """The tensors of an HF folder's safetensors shards (as its index lays them out), loaded one by one."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        index = self.folder / INDEX
        weight_map = _weight_map(index) if index.is_file() else None
        if weight_map is not None:
            files = [self.folder / name for name in dict.fromkeys(sorted(weight_map.values()))]
            for file in files:
                if not file.is_file():
                    raise ExarError(f"{index}: names the shard {file.name}, which is missing")
        else:
            files = sorted(self.folder.glob("model*.safetensors"))  # as convert_hf_to_gguf.py: not adapter_model
        if not files:
            raise ExarError(f"{self.folder}: no model*.safetensors weights (export reads safetensors only)")
        self.infos: dict[str, TensorInfo] = {}
        for file in files:
            self.infos.update(safetensors_infos(file))
        if weight_map is not None:
            _check_index(index, weight_map, self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def names(self) -> list[str]:
        return list(self.infos)

    def load(self, name: str):
        """One tensor (its stored dtype), mapped from its shard only until the caller lets it go."""
        from safetensors import safe_open

        info = self.infos[name]
        with safe_open(str(info.file), framework="pt") as f:
            return f.get_tensor(name)

    def by_file(self) -> dict[Path, list[str]]:
        files: dict[Path, list[str]] = {}
        for info in self.infos.values():
            files.setdefault(info.file, []).append(info.name)
        return files


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExarError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ExarError(f"{index}: weight_map is empty")
    return weight_map


def _check_index(index: Path, weight_map: dict[str, str], infos: dict[str, TensorInfo]) -> None:
    """The index and the shards must agree tensor for tensor, as transformers' loader assumes."""
    for name, shard in weight_map.items():
        if name not in infos:
            raise ExarError(f"{index}: lists {name} in {shard}, which holds no such tensor")
        if infos[name].file.name != shard:
            raise ExarError(f"{index}: lists {name} in {shard}, but it is in {infos[name].file.name}")
    extra = sorted(set(infos) - set(weight_map))
    if extra:
        raise ExarError(f"{index}: does not list {extra[0]} (in {infos[extra[0]].file.name})"
                        + (f" and {len(extra) - 1} more tensors" if len(extra) > 1 else ""))


def copy_tokenizer_files(src: Path, dest: Path) -> None:
    """Tokenizer, chat template and generation settings of an HF folder, copied byte for byte."""
    import shutil

    for file in Path(src).iterdir():
        if file.is_file() and (file.name.startswith(("tokenizer", "special_tokens", "added_tokens", "vocab", "merges"))
                               or file.name in ("chat_template.jinja", "chat_template.json", "generation_config.json")):
            shutil.copy2(file, Path(dest) / file.name)
