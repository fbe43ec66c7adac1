"""Builders for export tests: PEFT adapters made on the spot, runs holding them, and tiny models of
the Llama families people actually have (Llama-3 BPE, a transformers-5 folder, Mistral)."""

from __future__ import annotations

import json
from pathlib import Path

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Llama-3's pre-tokenizer split (its tokenizer.json) and a one-turn version of its chat template.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


def make_adapter(base_dir: Path, out_dir: Path, *, seed: int = 0, targets=ALL_LINEAR, r: int = 8, alpha: int = 16,
                 spread: float = 0.05) -> Path:
    """A PEFT LoRA on ``base_dir`` whose lora_B is a seeded normal, so it really changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * spread)
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


def make_run(root: Path, base_dir: Path, roles=("answer", "validator", "exar"), targets=ALL_LINEAR):
    """A run bound to ``base_dir`` with one adapter per role recorded, as the train stage leaves it."""
    from exar.basemodel import prompt_style, resolve_base
    from exar.rundir import Run

    run = Run.create(root)
    base = resolve_base(base_dir)
    run.bind_base(base.to_dict())
    run.update_settings("prompt", prompt_style(base_dir).to_dict())
    for seed, role in enumerate(roles):
        rel = f"adapters/{role}"
        make_adapter(base_dir, run.path(rel), seed=seed, targets=targets)
        run.record(rel, "adapter", role=role)
    return run


# --- tokenizers -----------------------------------------------------------------------------------

LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def build_llama3_tokenizer(folder: Path, vocab_gguf: Path | None = None, vocab_size: int = 1024) -> Path:
    """A Llama-3-style byte-level BPE tokenizer with BOS added as Llama-3 does (a Sequence post-processor:
    ByteLevel, then a template putting <|begin_of_text|> first). With ``vocab_gguf`` (llama.cpp's
    ggml-vocab-llama-bpe.gguf) it is Llama-3's own vocabulary; without, one trained here on exar's
    test corpus with Llama-3's split and special tokens (its pre-tokenizer hash is then unknown)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    split = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    if vocab_gguf is not None:
        from gguf import GGUFReader

        reader = GGUFReader(str(vocab_gguf))
        field = reader.get_field("tokenizer.ggml.tokens")
        tokens = [bytes(field.parts[i]).decode() for i in field.data]
        field = reader.get_field("tokenizer.ggml.token_type")
        types = [int(field.parts[i][0]) for i in field.data]
        field = reader.get_field("tokenizer.ggml.merges")
        merges = [tuple(bytes(field.parts[i]).decode().split(" ")) for i in field.data]
        normal = {text: i for i, text in enumerate(tokens) if types[i] == 1}
        tokenizer = Tokenizer(models.BPE(vocab=normal, merges=merges, ignore_merges=True, byte_fallback=False))
        tokenizer.pre_tokenizer = split
        tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                      for i in range(len(tokens)) if types[i] == 3])
    else:
        from tiny import _corpus

        tokenizer = Tokenizer(models.BPE(ignore_merges=True, byte_fallback=False))
        tokenizer.pre_tokenizer = split
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(LLAMA3_SPECIALS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(_corpus(), trainer)
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
        tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    bos = "<|begin_of_text|>"
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                      special_tokens=[(bos, tokens.index(bos))])])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": bos, "eos_token": "<|eot_id|>", "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True,
        "chat_template": LLAMA3_CHAT_TEMPLATE,
    }, indent=2))
    return folder


# --- models ---------------------------------------------------------------------------------------

def _save_random(folder: Path, config, *, seed: int, dtype: str = "float32", model_class=None) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = (model_class or LlamaForCausalLM)(config).to(torch.float32)
    with torch.no_grad():  # a wider spread than the default init, so logits are not all alike
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
    model.to(getattr(torch, dtype)).save_pretrained(str(folder))
    return folder


def build_llama3_style(folder: Path, vocab_gguf: Path | None = None, *, seed: int = 0, dtype: str = "float32",
                       hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
                       rope=LLAMA3_ROPE, tie: bool = True) -> Path:
    """A random Llama-3.2-style model: a Llama-3 tokenizer, llama3 rope scaling, GQA, tied embeddings."""
    from transformers import AutoTokenizer, LlamaConfig

    folder = build_llama3_tokenizer(folder, vocab_gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=ids[0], eos_token_id=ids[1:],
        rope_parameters=dict(rope) if rope else {"rope_type": "default", "rope_theta": 500000.0},
    )
    return _save_random(folder, config, seed=seed, dtype=dtype)


def build_transformers5_llama(folder: Path, *, seed: int = 0) -> Path:
    """The tiny Llama-2-style model as transformers 5 saves it: tokenizer.json, no tokenizer.model."""
    from tiny import build_tiny_llama

    folder = build_tiny_llama(folder, seed=seed)
    (folder / "tokenizer.model").unlink()
    return folder


def build_mistral_style(folder: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                        kv_heads: int = 2, intermediate: int = 128) -> Path:
    """A random Mistral-7B-v0.1-style model (MistralForCausalLM, sliding window, rope theta 1e6) on the
    tiny SentencePiece tokenizer with Mistral's [INST] chat template."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from tiny import build_tokenizer

    folder = build_tokenizer(folder)
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["chat_template"] = MISTRAL_CHAT_TEMPLATE
    config_path.write_text(json.dumps(tokenizer_config, indent=2))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=32768, sliding_window=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return _save_random(folder, config, seed=seed, model_class=MistralForCausalLM)


def build_on_tokenizer(folder: Path, tokenizer_dir: Path, *, seed: int = 0, sentencepiece: bool = True, hidden: int = 64,
                       layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
                       tie: bool = False) -> Path:
    """A random tiny Llama on a real tokenizer folder (Llama-2's); ``sentencepiece=False``: saved as
    transformers 5 saves it, tokenizer.json without tokenizer.model."""
    from transformers import AutoTokenizer, LlamaConfig

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.save_pretrained(str(folder))
    if sentencepiece:
        import shutil

        shutil.copy2(Path(tokenizer_dir) / "tokenizer.model", folder / "tokenizer.model")
    else:
        (folder / "tokenizer.model").unlink(missing_ok=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return _save_random(folder, config, seed=seed)
