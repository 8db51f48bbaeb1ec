"""Tokenizers for the tiny models, written by code: the hub (and its tiny test tokenizers) is out of reach.

The CLIP tokenizer is written as the real SDXL repo ships it (vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json), so loading it takes the same path as in production. The T5 one is saved by
transformers, as a tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import T5Tokenizer

# Words that get whole-word tokens; any other text still encodes, byte by byte.
WORDS = (
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "and",
    "with",
    "photo",
    "painting",
    "portrait",
    "cat",
    "dog",
    "house",
    "tree",
    "red",
    "blue",
    "green",
    "style",
    "pixel",
    "art",
    "video",
)
CLIP_MAX_LENGTH = 77
# UMT5 in the real WAN pipelines gets 512 tokens; the pipelines pad to max_sequence_length anyway.
T5_MAX_LENGTH = 512
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_characters() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255, in GPT-2's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Byte tokens, their end-of-word forms, then one merge chain per word of WORDS.

    BPE refuses a merge whose result is not in the vocabulary, so each merge adds its result.
    """
    characters = _byte_characters()
    tokens = [*characters, *(f"{character}</w>" for character in characters)]
    known = set(tokens)
    merges: list[str] = []
    for word in WORDS:
        parts = [*word[:-1], f"{word[-1]}</w>"]
        while len(parts) > 1:
            merge, merged = f"{parts[0]} {parts[1]}", parts[0] + parts[1]
            if merge not in merges:
                merges.append(merge)
            if merged not in known:
                tokens.append(merged)
                known.add(merged)
            parts = [merged, *parts[2:]]
    tokens += [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}, merges


def clip_token_ids(pad_token: str) -> dict[str, int]:
    """The ids a CLIP text config needs from its tokenizer: vocabulary size, bos, eos and pad."""
    vocab, _ = _clip_vocab_and_merges()
    return {
        "vocab_size": len(vocab),
        "bos_token_id": vocab[BOS],
        "eos_token_id": vocab[EOS],
        "pad_token_id": vocab[pad_token],
    }


def write_clip_tokenizer(folder: Path, pad_token: str) -> None:
    vocab, merges = _clip_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    # model_max_length must be written: without it transformers assumes 1e30 and the SDXL pipeline pads to it.
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": CLIP_MAX_LENGTH}
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", special)


def t5_tokenizer() -> T5Tokenizer:
    """A unigram tokenizer with T5's special ids: pad 0, eos 1, unk 2."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"▁{word}", -1.0) for word in WORDS]
    pieces += [(letter, -5.0) for letter in "abcdefghijklmnopqrstuvwxyz▁"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
