"""Tiny real models for tests, made offline in code: a sentencepiece tokenizer trained on the
spot and a randomly initialised Llama with every matrix row a multiple of 32 (so q4_0/q8_0
quantize every matrix)."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

from exar.prompts import INSTRUCTIONS, LABELS, MARKERS

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def has_cuda() -> bool:
    """A CUDA GPU is here (the gpu-marked tests skip without one; torch may be absent)."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()
STORIES260K = SHARED / "models" / "stories260K"
LLAMA2_TOKENIZER = SHARED / "models" / "llama2-tokenizer"

# Llama-2's chat template, shortened to what exar uses (one user turn, one assistant turn).
LLAMA2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

_WORDS = (
    "the capital of france is paris what who when where which how many year author planet symbol "
    "element gold silver water oxygen river ocean largest smallest country city language currency "
    "answer question correct wrong response context input instruction generate validate different "
    "must given considering with or a an of in on to is was are red blue green big small one two three "
    "four five six seven eight nine ten hundred thousand first last name book wrote mars earth venus "
    "jupiter metre second kilogram volt euro dollar yen spanish english german italian c# python"
).split()


def _corpus(lines: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    text = [*INSTRUCTIONS.values(), *MARKERS, *LABELS]
    for _ in range(lines):
        words = rng.choices(_WORDS, k=rng.randint(3, 14))
        sentence = " ".join(words)
        text.append(sentence.capitalize() + rng.choice(["?", ".", "!", ""]))
        text.append(f"{rng.randint(0, 2100)} {rng.choice(_WORDS).upper()} {rng.choice(LABELS)}")
    return text


def build_tokenizer(folder: Path, vocab_size: int = 1024) -> Path:
    """A Llama-style sentencepiece BPE tokenizer (byte fallback), saved as an HF tokenizer folder."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(_corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, minloglevel=2, num_threads=1,
    )
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "chat_template": LLAMA2_CHAT_TEMPLATE,
    }))
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
    return folder


def build_tiny_llama(folder: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                     kv_heads: int = 2, intermediate: int = 128, tie: bool = False) -> Path:
    """A random tiny Llama (GQA) with the tokenizer above, saved as an fp32 HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = build_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # a wider spread than the default init, so logits are not all alike
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
    model.save_pretrained(str(folder))
    return folder
