"""The vocabulary of an HF Llama folder, as llama.cpp's convert_hf_to_gguf.py writes it.

The same three routes as ``LlamaModel.set_vocab`` in llama.cpp's conversion/llama.py, in the
same order: a SentencePiece ``tokenizer.model``; else a byte-fallback BPE ``tokenizer.json``
(what transformers 5 saves for Llama-2 and Mistral) through gguf-py's ``LlamaHfVocab``; else a
byte-level BPE (Llama-3, SmolLM) named by llama.cpp's pre-tokenizer hash. Special tokens, merges
and the chat template come from gguf-py's ``SpecialVocab``. Two places differ from the converter
on purpose, each because the converter's file would not tokenize as the HF tokenizer does:

- ``LlamaHfVocab`` gives every token the score -1000, and llama.cpp's SentencePiece tokenizer
  merges by score, so such a file splits words apart ("ied" -> "i" "ed"); exar scores each token
  by the rank of the merge that makes it in tokenizer.json, which is the order HF merges in.
- the add-BOS / add-EOS flags are set to what the HF tokenizer really does to a text, wherever
  gguf-py leaves them unset and llama.cpp's default would do otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from exar.errors import ExarError
from exar.export.pretokenizers import BY_HASH, CHECK_TEXT, LLAMA_CPP_COMMIT
from exar.rundir import read_json

# llama.cpp adds BOS by itself for SentencePiece vocabularies and for these BPE pre-tokenizers
# (llama-vocab.cpp at LLAMA_CPP_COMMIT); elsewhere it adds none unless the file says so.
_BPE_PRES_ADDING_BOS = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                        "jina-v5-nano", "tekken", "chameleon")
_CODELLAMA_VOCAB = 32016   # convert_hf_to_gguf.py gives CodeLlama its end-of-infill token
_GRANITE_SMALL_VOCAB = 49152  # ... and writes add_bos_token False for this vocabulary size (SmolLM too)


@dataclass
class Vocab:
    model: str                      # "llama" (SentencePiece-style) or "gpt2" (byte-level BPE)
    pre: str                        # tokenizer.ggml.pre
    route: str                      # "sentencepiece", "llama-hf" or "bpe"
    tokens: list                    # str or UTF-8 bytes
    scores: list[float] | None
    types: list[int]
    special: object = None          # gguf.SpecialVocab
    add_space_prefix: bool | None = None
    codellama_eot: int = 32010      # CodeLlama's end of infill, unless its files name another
    notes: list[str] = field(default_factory=list)


def pre_tokenizer(tokenizer, where: Path, override: str | None = None) -> str:
    """llama.cpp's name for a BPE tokenizer's pre-tokenizer, from the hash of ``tokenizer.encode(CHECK_TEXT)``."""
    if override:
        names = sorted(set(BY_HASH.values()))
        if override not in names:
            raise ExarError(f"unknown pre-tokenizer {override!r}; llama.cpp's converter names: {', '.join(names)}")
        return override
    check = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if check not in BY_HASH:
        raise ExarError(f"{where}: BPE pre-tokenizer not recognised (hash {check}, not in llama.cpp "
                        f"{LLAMA_CPP_COMMIT}'s table); if you know which it is, pass --pre-tokenizer NAME")
    return BY_HASH[check]


def read_vocab(hf_dir: Path | str, n_vocab: int, tokenizer, *, pre_override: str | None = None) -> Vocab:
    """The vocabulary of ``hf_dir`` for a model with ``n_vocab`` embedding rows; ``tokenizer`` is its AutoTokenizer."""
    import gguf

    hf_dir = Path(hf_dir)
    with _quiet_gguf():
        if (hf_dir / "tokenizer.model").is_file():
            vocab = _sentencepiece(hf_dir, n_vocab)
        else:
            try:
                vocab = _llama_hf(hf_dir, n_vocab)
            except (FileNotFoundError, TypeError):  # not a byte-fallback BPE: a byte-level one (Llama 3)
                vocab = _bpe(hf_dir, n_vocab, tokenizer, pre_override)
        vocab.special = gguf.SpecialVocab(hf_dir, load_merges=vocab.model == "gpt2",
                                          n_vocab=None if vocab.model == "gpt2" else len(vocab.tokens))
    if vocab.model == "gpt2" and not vocab.special.merges:
        raise ExarError(f"{hf_dir}: the BPE tokenizer has no merges")
    config = _json(hf_dir / "tokenizer_config.json")
    vocab.add_space_prefix = config.get("add_prefix_space")
    if len(vocab.tokens) == _CODELLAMA_VOCAB:
        with _quiet_gguf():
            named = gguf.SpecialVocab(hf_dir, special_token_types=["eot"]).special_token_ids
        vocab.codellama_eot = named.get("eot", vocab.codellama_eot)
    _match_special_flags(vocab, hf_dir, tokenizer)
    return vocab


def add_vocab(writer, vocab: Vocab) -> None:
    """Write ``vocab`` into a GGUFWriter, in the order convert_hf_to_gguf.py writes it."""
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    vocab.special.add_to_gguf(writer, quiet=True)
    if len(vocab.tokens) == _CODELLAMA_VOCAB:  # of its infill tokens gguf-py can only write eot
        writer.add_eot_token_id(vocab.codellama_eot)
    if len(vocab.tokens) == _GRANITE_SMALL_VOCAB:
        writer.add_add_bos_token(False)


# --- the three routes ---------------------------------------------------------------------------

def _sentencepiece(hf_dir: Path, n_vocab: int) -> Vocab:
    """convert_hf_to_gguf.py's _create_vocab_sentencepiece: pieces, then added_tokens.json, then the config's added tokens."""
    import gguf

    pieces = gguf.SentencePieceVocab(hf_dir)
    tokens: list = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for token_id, (text, score, kind) in enumerate(pieces.sentencepiece_tokens()):
        if token_id >= n_vocab:
            break
        tokens[token_id], scores[token_id], types[token_id] = text, score, int(kind)
    for text, token_id in _json(hf_dir / "added_tokens.json").items():
        if token_id < n_vocab:
            tokens[token_id], scores[token_id], types[token_id] = text.encode(), -1000.0, int(gguf.TokenType.USER_DEFINED)
    added = _json(hf_dir / "tokenizer_config.json").get("added_tokens_decoder") or {}
    for key, data in added.items():
        token_id, text = int(key), data["content"]
        if token_id >= n_vocab:
            continue
        if data.get("special") or _looks_special(text):
            types[token_id] = int(gguf.TokenType.CONTROL)
        else:
            text = text.replace("\u2581", " ")
            types[token_id] = int(gguf.TokenType.USER_DEFINED)
        tokens[token_id], scores[token_id] = text.encode(), -1000.0
    return Vocab("llama", "default", "sentencepiece", tokens, scores, types)


def _llama_hf(hf_dir: Path, n_vocab: int) -> Vocab:
    """gguf-py's LlamaHfVocab, scored by merge rank (see the module docstring)."""
    import gguf

    hf_vocab = gguf.LlamaHfVocab(hf_dir)
    tokens, types = [], []
    for text, _score, kind in hf_vocab.all_tokens():
        tokens.append(text)
        types.append(int(kind))
    if len(tokens) != n_vocab:
        raise ExarError(f"{hf_dir}: the tokenizer has {len(tokens)} tokens, the embedding {n_vocab} rows; llama.cpp "
                        "cannot load such a file")
    merges = _json(hf_dir / "tokenizer.json")["model"]["merges"]
    rank: dict[str, int] = {}
    for position, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, position)
    never = -float(len(merges) + 1)  # tokens no merge makes (characters, bytes, added tokens)
    scores = [-float(rank[text.decode("utf-8")]) if text.decode("utf-8", "replace") in rank else never
              for text in tokens]
    return Vocab("llama", "default", "llama-hf", tokens, scores, types,
                 notes=["scores from tokenizer.json merge ranks (llama.cpp's converter writes -1000 for every token)"])


def _bpe(hf_dir: Path, n_vocab: int, tokenizer, pre_override: str | None) -> Vocab:
    """convert_hf_to_gguf.py's get_vocab_base: every id up to the embedding's rows, added tokens typed."""
    import gguf

    tokenizer_json = _json(hf_dir / "tokenizer.json")
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExarError(f"{hf_dir}: tokenizer is neither SentencePiece (tokenizer.model), byte-fallback BPE nor "
                        "byte-level BPE (tokenizer.json)")
    vocab = tokenizer.vocab
    if max(vocab.values()) >= n_vocab:
        raise ExarError(f"{hf_dir}: tokenizer has ids up to {max(vocab.values())}, the embedding {n_vocab} rows")
    pre = pre_tokenizer(tokenizer, hf_dir, pre_override)
    reverse = {token_id: text for text, token_id in vocab.items()}
    added_vocab = tokenizer.get_added_vocab()
    added_decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
            continue
        text = reverse[i]
        if text in added_vocab:
            if not added_decoder[i].normalized:  # llama.cpp expects added tokens pre-normalized
                text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
            if added_decoder[i].special or _looks_special(text):
                types.append(int(gguf.TokenType.CONTROL))
            else:
                text = text.replace("\u2581", " ")
                types.append(int(gguf.TokenType.USER_DEFINED))
        else:
            types.append(int(gguf.TokenType.NORMAL))
        tokens.append(text)
    return Vocab("gpt2", pre, "bpe", tokens, None, types)


def _looks_special(text: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>")) or (text.startswith("<unused") and text.endswith(">")))


# --- add BOS / EOS --------------------------------------------------------------------------------

def _match_special_flags(vocab: Vocab, hf_dir: Path, tokenizer) -> None:
    """Make llama.cpp add BOS/EOS exactly when the HF tokenizer does.

    A flag gguf-py set keeps its key and takes the tokenizer's behaviour; a byte-level
    post-processor gets both flags written, as gguf-py does from llama.cpp 0c1e57098 on (older
    gguf releases leave them out); an unset flag is written where llama.cpp's default differs.
    """
    probe = tokenizer("a").input_ids
    does = {
        "bos": tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
        "eos": tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id],
    }
    post = _json(hf_dir / "tokenizer.json").get("post_processor") or {}
    byte_level = any(p.get("type") == "ByteLevel" for p in post.get("processors", [post]))
    default = {"bos": vocab.model == "llama" or vocab.pre in _BPE_PRES_ADDING_BOS, "eos": False}
    if len(vocab.tokens) == _GRANITE_SMALL_VOCAB:
        default["bos"] = False  # add_vocab writes add_bos_token False for it
    flags = vocab.special.add_special_token
    for kind, adds in does.items():
        if kind in flags or byte_level or adds != default[kind]:
            if kind in flags and flags[kind] != adds:
                vocab.notes.append(f"add_{kind}_token {adds} (the tokenizer's behaviour; its files say {flags[kind]})")
            flags[kind] = adds


@contextlib.contextmanager
def _quiet_gguf():
    """gguf-py logs its parsing doubts as warnings; the export gate checks the outcome instead."""
    logger = logging.getLogger("gguf")
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def _json(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}
