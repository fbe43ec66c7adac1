"""Meta's consolidated checkpoint layout: ``consolidated.NN.pth`` per model-parallel shard + ``params.json``.

Keys are Meta's (``layers.0.attention.wq.weight``, ...), q/k rows interleaved per head as in
Meta's release, tensors split across shards the way Meta's model-parallel layers split them
(column-parallel along rows, row-parallel along columns, norms replicated; the embedding along
columns in Llama-2's ``ParallelEmbedding``, along rows in Llama-3's ``VocabParallelEmbedding``),
and ``params.json`` holding exactly the fields the family's own loader accepts:

- ``llama2``: meta-llama/llama ``ModelArgs(**params)`` (no ``rope_theta``: it would raise TypeError);
- ``llama3``: meta-llama/llama3 ``ModelArgs`` (adds ``rope_theta``), also CodeLlama's and SmolLM's;
- ``llama3.1``: meta-llama/llama-models ``ModelArgs`` (adds ``use_scaled_rope``; Meta's code
  hard-codes factor 8, low 1, high 4, original context 8192, which a note records when the
  model's config says otherwise, as Llama-3.2's does);
- ``mistral``: mistral-inference ``TransformerArgs`` (``head_dim``, ``hidden_dim``, one file).

Each shard is written by ``exar.export.streamed`` one tensor at a time, so memory holds one tensor.
"""

from __future__ import annotations

import collections
import json
import pickle
import shutil
from pathlib import Path
from typing import Iterator

from exar.errors import ExarError
from exar.export.hfmodel import LlamaShape, TensorSource, deinterleave_qk, interleave_qk
from exar.export.streamed import OutTensor, write_torch_checkpoint
from exar.rundir import atomic_path

PARAMS = "params.json"
FAMILIES = ("llama2", "llama3", "llama3.1", "mistral")
# HF name suffix in a block -> (Meta name, split dimension across shards or None to replicate)
_LAYER_KEYS = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}
_EMBED_SPLIT = {"llama2": 1, "llama3": 0, "llama3.1": 0, "mistral": None}
_META_LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}
# Meta's release: 7-8B on 1 GPU, 13B on 2, 33-34B on 4, 65-70B (and 405B) on 8.
_SHARDS_BY_SIZE = ((10e9, 1), (20e9, 2), (45e9, 4))


def model_parallel_shards(n_params: int) -> int:
    for limit, shards in _SHARDS_BY_SIZE:
        if n_params < limit:
            return shards
    return 8


def ffn_params(hidden: int, intermediate: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) for which Meta's FFN size formula gives ``intermediate``."""
    multiple_of = 256
    while intermediate % multiple_of:
        multiple_of //= 2
    if meta_ffn_size(hidden, multiple_of, None) == intermediate:
        return multiple_of, None
    multiplier = (intermediate + 0.5) / int(2 * 4 * hidden / 3)
    if meta_ffn_size(hidden, multiple_of, multiplier) != intermediate:
        raise ExarError(f"no Meta ffn_dim_multiplier gives intermediate_size {intermediate} for dim {hidden}")
    return multiple_of, multiplier


def meta_ffn_size(dim: int, multiple_of: int, multiplier: float | None) -> int:
    """Meta's FeedForward hidden size (llama/model.py)."""
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_family(shape: LlamaShape, where: Path) -> str:
    """Which of Meta's (or Mistral's) loaders a model's consolidated checkpoint is written for."""
    if shape.model_type == "mistral":
        return "mistral"
    if shape.head_dim != shape.hidden // shape.heads:
        raise ExarError(f"{where}: head_dim {shape.head_dim} is not dim / n_heads, which Meta's params.json cannot "
                        "express; export with --no-consolidated")
    if shape.rope_scaling is not None:
        if shape.rope_scaling["rope_type"].lower() == "llama3":
            return "llama3.1"
        raise ExarError(f"{where}: rope scaling {shape.rope_scaling['rope_type']} has no place in Meta's params.json; "
                        "export with --no-consolidated")
    return "llama2" if shape.rope_theta == 10000.0 else "llama3"


def meta_params(shape: LlamaShape, family: str) -> tuple[dict, list[str]]:
    """(params.json, notes) for ``family``: only fields its ModelArgs / TransformerArgs accepts."""
    notes = []
    if family == "mistral":
        params = {"dim": shape.hidden, "n_layers": shape.layers, "head_dim": shape.head_dim,
                  "hidden_dim": shape.intermediate, "n_heads": shape.heads, "n_kv_heads": shape.kv_heads,
                  "norm_eps": shape.norm_eps, "vocab_size": shape.vocab, "rope_theta": shape.rope_theta}
        if shape.sliding_window:
            params["sliding_window"] = shape.sliding_window
        return params, notes
    multiple_of, multiplier = ffn_params(shape.hidden, shape.intermediate)
    if family == "llama2":  # the order of Meta's Llama-2 release
        params = {"dim": shape.hidden, "multiple_of": multiple_of}
        if multiplier is not None:
            params["ffn_dim_multiplier"] = multiplier
        params["n_heads"] = shape.heads
        if shape.kv_heads != shape.heads:
            params["n_kv_heads"] = shape.kv_heads
        params.update(n_layers=shape.layers, norm_eps=shape.norm_eps, vocab_size=shape.vocab)
        return params, notes
    params = {"dim": shape.hidden, "n_layers": shape.layers, "n_heads": shape.heads, "n_kv_heads": shape.kv_heads,
              "vocab_size": shape.vocab, "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier,
              "norm_eps": shape.norm_eps, "rope_theta": shape.rope_theta}
    if family == "llama3.1":
        params["use_scaled_rope"] = True
        differ = {k: shape.rope_scaling.get(k) for k, v in _META_LLAMA3_ROPE.items()
                  if shape.rope_scaling.get(k, v) != v}
        if differ:
            notes.append(f"Meta's reference code applies llama3 rope scaling with {_META_LLAMA3_ROPE}; this model's "
                         f"config says {differ} (as Llama-3.2's does), which params.json cannot express")
    return params, notes


def consolidated_layout(hf_dir: Path | str, shards: int | None = None) -> tuple[str, dict, list[str], list[tuple[int, OutTensor]]]:
    """(family, params, notes, [(shard, tensor)]) of the consolidated checkpoint of ``hf_dir``, in Meta's module order."""
    import torch

    hf_dir = Path(hf_dir)
    shape = LlamaShape.read(hf_dir)
    family = meta_family(shape, hf_dir / "config.json")
    source = TensorSource(hf_dir)
    biases = [n for n in source.names() if n.endswith(".bias")]
    if biases:
        raise ExarError(f"{hf_dir}: {biases[0]}: Meta's layout has no biases; export with --no-consolidated")
    shards = 1 if family == "mistral" else (shards or model_parallel_shards(shape.n_params))
    if shape.kv_heads % shards or shape.heads % shards:
        raise ExarError(f"{hf_dir}: {shape.heads}/{shape.kv_heads} heads cannot be split over {shards} model-parallel shards")
    params, notes = meta_params(shape, family)

    entries = [("model.embed_tokens.weight", "tok_embeddings.weight", _EMBED_SPLIT[family])]
    for layer in range(shape.layers):
        entries += [(f"model.layers.{layer}.{hf}", f"layers.{layer}.{meta}", split) for hf, (meta, split) in _LAYER_KEYS.items()]
    output = "lm_head.weight" if "lm_head.weight" in source else "model.embed_tokens.weight"  # tied: Meta's explicit output
    entries += [("model.norm.weight", "norm.weight", None), (output, "output.weight", 0)]
    missing = [hf for hf, _, _ in entries if hf not in source]
    if missing:
        raise ExarError(f"{hf_dir}: no tensor {missing[0]} (Meta's layout needs it)")

    def piece(hf_name: str, split: int | None, shard: int):
        tensor = source.load(hf_name)
        heads = shape.qk_heads(hf_name)
        if heads is not None:
            tensor = interleave_qk(tensor, heads)
        return tensor if split is None else torch.chunk(tensor, shards, dim=split)[shard]

    layout = []
    for shard in range(shards):
        for hf_name, meta_name, split in entries:
            info = source.infos[hf_name]
            dims = list(info.shape)
            if split is not None:
                dims[split] //= shards
            dtype = getattr(torch, {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[info.dtype])
            layout.append((shard, OutTensor(meta_name, dtype, tuple(dims),
                                            lambda h=hf_name, s=split, k=shard: piece(h, s, k))))
    return family, params, notes, layout


def write_consolidated(hf_dir: Path | str, out_dir: Path | str, *, shards: int | None = None, progress: bool = True) -> dict:
    """Write the Llama HF folder ``hf_dir`` in Meta's (or Mistral's) layout at ``out_dir``, one shard at a time."""
    from exar.progress import bar

    hf_dir = Path(hf_dir)
    family, params, notes, layout = consolidated_layout(hf_dir, shards)
    count = max(shard for shard, _ in layout) + 1
    with atomic_path(out_dir, is_dir=True) as tmp:
        for shard in bar(range(count), desc="consolidated", unit="shard") if progress else range(count):
            write_torch_checkpoint(tmp / f"consolidated.{shard:02d}.pth", [spec for s, spec in layout if s == shard])
        (tmp / PARAMS).write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
        if (hf_dir / "tokenizer.model").is_file():
            shutil.copy2(hf_dir / "tokenizer.model", tmp / "tokenizer.model")
    return {"shards": count, "family": family, "params": params, **({"notes": notes} if notes else {})}


# --- reading back -------------------------------------------------------------------------------------

class _Unpickler(pickle.Unpickler):
    """data.pkl of a torch.save'd dict of tensors, without torch.load: name -> (storage id, offset, size, stride)."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: (storage, offset, tuple(size), tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return name
        raise pickle.UnpicklingError(f"unexpected {module}.{name} in a consolidated checkpoint")

    def persistent_load(self, pid):
        return pid


_STORAGE_DTYPES = {"HalfStorage": "float16", "BFloat16Storage": "bfloat16", "FloatStorage": "float32"}


def iter_consolidated(folder: Path | str) -> Iterator[tuple[int, str, object]]:
    """(shard, Meta name, tensor) of every tensor in a consolidated folder, each read on its own (not mapped)."""
    import io

    import torch

    files = sorted(Path(folder).glob("consolidated.*.pth"))
    if not files:
        raise ExarError(f"{folder}: no consolidated.*.pth")
    for shard, file in enumerate(files):
        try:
            reader = torch._C.PyTorchFileReader(str(file))
            layout = _Unpickler(io.BytesIO(reader.get_record("data.pkl"))).load()
            for name, ((_, storage_type, key, _, numel), offset, size, stride) in layout.items():
                dtype = getattr(torch, _STORAGE_DTYPES[storage_type])
                raw = reader.get_storage_from_record(f"data/{key}", numel * dtype.itemsize, torch.uint8)
                yield shard, name, torch.empty(0, dtype=dtype).set_(raw.untyped_storage(), offset, size, stride)
        except (RuntimeError, pickle.UnpicklingError, KeyError, ValueError) as e:
            raise ExarError(f"{file}: cannot read the checkpoint ({type(e).__name__}: {e})") from None


def expected_tensors(hf_dir: Path | str, folder: Path | str) -> list[tuple[int, OutTensor]]:
    """What ``write_consolidated`` puts in ``folder`` from ``hf_dir`` (as many shards as the folder holds)."""
    return consolidated_layout(hf_dir, len(list(Path(folder).glob("consolidated.*.pth"))))[3]


def read_consolidated(folder: Path | str) -> tuple[dict, dict]:
    """(HF config dict, HF state dict) from a consolidated folder, shards joined, q/k rows restored."""
    import torch

    folder = Path(folder)
    params_path = folder / PARAMS
    if not params_path.is_file():
        raise ExarError(f"{folder}: no {PARAMS} (not a Meta consolidated checkpoint)")
    params = json.loads(params_path.read_text(encoding="utf-8"))
    parts: dict[str, list] = {}
    for _, name, tensor in iter_consolidated(folder):
        parts.setdefault(name, []).append(tensor)
    n_heads, n_kv = params["n_heads"], params.get("n_kv_heads") or params["n_heads"]
    embed_split = 1 if "rope_theta" not in params else 0  # Llama-2's ParallelEmbedding: columns
    splits = {"tok_embeddings.weight": ("model.embed_tokens.weight", embed_split), "norm.weight": ("model.norm.weight", None),
              "output.weight": ("lm_head.weight", 0)}
    for layer in range(params["n_layers"]):
        for hf, (meta, split) in _LAYER_KEYS.items():
            splits[f"layers.{layer}.{meta}"] = (f"model.layers.{layer}.{hf}", split)
    state = {}
    for meta_name, pieces in parts.items():
        if meta_name not in splits:
            raise ExarError(f"{folder}: unexpected tensor {meta_name}")
        hf_name, split = splits[meta_name]
        tensor = pieces[0] if split is None or len(pieces) == 1 else torch.cat(pieces, dim=split)
        if hf_name.endswith("q_proj.weight"):
            tensor = deinterleave_qk(tensor, n_heads)
        elif hf_name.endswith("k_proj.weight"):
            tensor = deinterleave_qk(tensor, n_kv)
        state[hf_name] = tensor
    embed, output = state["model.embed_tokens.weight"], state["lm_head.weight"]
    intermediate = params.get("hidden_dim") or meta_ffn_size(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier"))
    if state["model.layers.0.mlp.gate_proj.weight"].shape[0] != intermediate:
        raise ExarError(f"{params_path}: multiple_of/ffn_dim_multiplier give {intermediate}, the weights another FFN size")
    tied = torch.equal(embed, output)
    if tied:
        del state["lm_head.weight"]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": params["dim"], "num_hidden_layers": params["n_layers"],
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "intermediate_size": intermediate, "rms_norm_eps": params["norm_eps"], "vocab_size": params["vocab_size"],
        "rope_theta": params.get("rope_theta", 10000.0), "tie_word_embeddings": tied,
        "head_dim": params.get("head_dim") or params["dim"] // n_heads,
    }
    return config, state
