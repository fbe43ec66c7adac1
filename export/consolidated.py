"""Meta's consolidated checkpoint layout: ``consolidated.NN.pth`` per model-parallel shard + ``params.json``.

Keys are Meta's (``layers.0.attention.wq.weight``, ...), q/k rows interleaved per head as in
Meta's release, and tensors split across shards the way Meta's model-parallel layers split them
(column-parallel along rows, row-parallel and the embedding along columns, norms replicated).
``read_consolidated`` turns the files back into an HF config + state dict, loading with
``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from exar.errors import ExarError
from exar.export.hfmodel import LlamaShape, TensorSource, deinterleave_qk, interleave_qk
from exar.rundir import atomic_path

PARAMS = "params.json"
# HF name pattern -> (Meta name pattern, split dimension across shards or None to replicate)
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
_TOP_KEYS = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", 1),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", 0),
}
# Meta's release: 7-8B on 1 GPU, 13B on 2, 33-34B on 4, 65-70B on 8.
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


def write_consolidated(hf_dir: Path | str, out_dir: Path | str, *, shards: int | None = None, progress: bool = True) -> dict:
    """Write the Llama HF folder ``hf_dir`` in Meta's layout at ``out_dir`` (shard count by model size)."""
    import torch

    from exar.progress import bar

    hf_dir = Path(hf_dir)
    shape = LlamaShape.read(hf_dir)
    if shape.rope_scaling is not None:
        raise ExarError(f"{hf_dir}/config.json: rope scaling {shape.rope_scaling['rope_type']} has no place in params.json")
    source = TensorSource(hf_dir)
    shards = shards or model_parallel_shards(shape.n_params)
    if shape.kv_heads % shards or shape.heads % shards:
        raise ExarError(f"{hf_dir}: {shape.heads}/{shape.kv_heads} heads cannot be split over {shards} model-parallel shards")
    multiple_of, multiplier = ffn_params(shape.hidden, shape.intermediate)
    params = {"dim": shape.hidden, "n_layers": shape.layers, "n_heads": shape.heads, "n_kv_heads": shape.kv_heads,
              "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier, "norm_eps": shape.norm_eps,
              "vocab_size": shape.vocab, "rope_theta": shape.rope_theta}

    parts: list[dict] = [{} for _ in range(shards)]
    names = _hf_names(shape, source)
    for hf_name in bar(names, desc="consolidated", unit="tensor") if progress else names:
        meta_name, split = _meta_key(hf_name)
        tensor = source.load("model.embed_tokens.weight" if hf_name == "lm_head.weight" and hf_name not in source else hf_name)
        heads = shape.qk_heads(hf_name)
        if heads is not None:
            tensor = interleave_qk(tensor, heads)
        pieces = [tensor] * shards if split is None else torch.chunk(tensor, shards, dim=split)
        for part, piece in zip(parts, pieces):
            part[meta_name] = piece.clone()
    with atomic_path(out_dir, is_dir=True) as tmp:
        for index, part in enumerate(parts):
            torch.save(part, tmp / f"consolidated.{index:02d}.pth")
        (tmp / PARAMS).write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
        if (hf_dir / "tokenizer.model").is_file():
            shutil.copy2(hf_dir / "tokenizer.model", tmp / "tokenizer.model")
    return {"shards": shards, "params": params}


def _hf_names(shape: LlamaShape, source: TensorSource) -> list[str]:
    """Every tensor Meta's layout holds; a tied model gets an explicit output.weight."""
    names = [n for n in source.names() if not n.endswith("rotary_emb.inv_freq")]
    if "lm_head.weight" not in names:
        names.append("lm_head.weight")
    return names


def _meta_key(hf_name: str) -> tuple[str, int | None]:
    if hf_name in _TOP_KEYS:
        return _TOP_KEYS[hf_name]
    prefix, _, rest = hf_name.partition(".layers.")
    layer, _, suffix = rest.partition(".")
    if prefix != "model" or suffix not in _LAYER_KEYS:
        raise ExarError(f"tensor {hf_name} has no place in Meta's Llama layout")
    meta, split = _LAYER_KEYS[suffix]
    return f"layers.{layer}.{meta}", split


def read_consolidated(folder: Path | str) -> tuple[dict, dict]:
    """(HF config dict, HF state dict) from a consolidated folder, shards joined, q/k rows restored."""
    import torch

    folder = Path(folder)
    params_path = folder / PARAMS
    if not params_path.is_file():
        raise ExarError(f"{folder}: no {PARAMS} (not a Meta consolidated checkpoint)")
    params = json.loads(params_path.read_text(encoding="utf-8"))
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise ExarError(f"{folder}: no consolidated.*.pth")
    try:
        parts = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    except Exception as e:  # torch raises RuntimeError / pickle errors on damaged files
        raise ExarError(f"{folder}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
    hf_of_meta = {meta: (hf, split) for hf, (meta, split) in _TOP_KEYS.items()}
    for layer in range(params["n_layers"]):
        for suffix, (meta, split) in _LAYER_KEYS.items():
            hf_of_meta[f"layers.{layer}.{meta}"] = (f"model.layers.{layer}.{suffix}", split)
    heads = {"q_proj": params["n_heads"], "k_proj": params.get("n_kv_heads") or params["n_heads"]}
    state = {}
    for meta_name in parts[0]:
        if meta_name not in hf_of_meta:
            raise ExarError(f"{files[0]}: unexpected tensor {meta_name}")
        hf_name, split = hf_of_meta[meta_name]
        tensor = parts[0][meta_name] if split is None else torch.cat([p[meta_name] for p in parts], dim=split)
        kind = hf_name.split(".")[-2]
        if kind in heads:
            tensor = deinterleave_qk(tensor, heads[kind])
        state[hf_name] = tensor
    embed, output = state["model.embed_tokens.weight"], state["lm_head.weight"]
    intermediate = meta_ffn_size(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier"))
    if state["model.layers.0.mlp.gate_proj.weight"].shape[0] != intermediate:
        raise ExarError(f"{params_path}: multiple_of/ffn_dim_multiplier give {intermediate}, the weights another FFN size")
    tied = torch.equal(embed, output)
    if tied:
        del state["lm_head.weight"]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": params["dim"], "num_hidden_layers": params["n_layers"],
        "num_attention_heads": params["n_heads"], "num_key_value_heads": params.get("n_kv_heads") or params["n_heads"],
        "intermediate_size": intermediate, "rms_norm_eps": params["norm_eps"], "vocab_size": params["vocab_size"],
        "rope_theta": params.get("rope_theta", 10000.0), "tie_word_embeddings": tied,
        "head_dim": params["dim"] // params["n_heads"],
    }
    return config, state
