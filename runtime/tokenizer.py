"""CLIP's byte-level BPE tokenizer in plain Python, from an exported ``tokenizer/`` directory
(``tokenizer.json``, or ``vocab.json`` and ``merges.txt``), as transformers' CLIPTokenizer encodes for Stable Diffusion:
NFC, whitespace runs to one space, lowercase; split into special tokens, contractions, letter
runs, single digits and runs of other symbols; bytes mapped to printable characters; BPE with
the ``</w>`` end-of-word mark; ``<|startoftext|>`` + up to 75 tokens + ``<|endoftext|>``,
padded to 77 with the directory's pad token (``<|endoftext|>``; SDXL's second tokenizer:
``!``). tests/runtime/test_runtime_tokenizer.py compares it with
transformers on a spread of prompts.
"""

from __future__ import annotations

import json
import unicodedata
from functools import lru_cache
from pathlib import Path

from bf.models.tokenizer_files import BOS, EOS, MAX_LENGTH, bytes_to_unicode  # the same constants and byte map bf writes the files with

CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def _is_letter(c: str) -> bool:
    return unicodedata.category(c).startswith("L")


def _is_number(c: str) -> bool:
    return unicodedata.category(c).startswith("N")


def pre_tokenize(text: str) -> list[str]:
    """The pieces the BPE sees (before the byte mapping)."""
    text = " ".join(unicodedata.normalize("NFC", text).split()).lower()
    pieces, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        special = next((s for s in (BOS, EOS) if text.startswith(s, i)), None)
        contraction = next((s for s in CONTRACTIONS if text.startswith(s, i)), None) if c == "'" else None
        if special or contraction:
            pieces.append(special or contraction)
            i += len(pieces[-1])
            continue
        j = i + 1
        if _is_letter(c):
            while j < n and _is_letter(text[j]):
                j += 1
        elif not _is_number(c):  # a run of symbols
            while j < n and not (text[j].isspace() or _is_letter(text[j]) or _is_number(text[j])):
                j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


def read_vocab_and_merges(directory: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """From ``tokenizer.json`` (what ``bf export`` writes) or ``vocab.json`` + ``merges.txt``."""
    try:
        if (directory / "tokenizer.json").is_file():
            model = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
                raise ValueError("not CLIP's BPE model")
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            return model["vocab"], merges
        vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
        return vocab, [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{directory}: not a CLIP tokenizer directory (tokenizer.json, or vocab.json and merges.txt): {e}") from None


def pad_token(directory: Path) -> str:
    """The pad token a tokenizer directory names (special_tokens_map.json or tokenizer_config.json; a string or an
    AddedToken object), else the end token."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            pad = json.loads((directory / name).read_text(encoding="utf-8")).get("pad_token")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str):
            return pad
    return EOS


class ClipTokenizer:
    def __init__(self, directory: Path):
        self.vocab, merges = read_vocab_and_merges(Path(directory))
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self.byte_map = bytes_to_unicode()
        self.bos, self.eos = self.vocab[BOS], self.vocab[EOS]
        self.pad = self.vocab.get(pad_token(Path(directory)), self.eos)  # SDXL's second tokenizer pads with "!"
        self._bpe = lru_cache(maxsize=65536)(self._bpe_uncached)

    def _bpe_uncached(self, piece: str) -> tuple[str, ...]:
        word = (*piece[:-1], piece[-1] + "</w>")
        while len(word) > 1:
            pairs = {(word[k], word[k + 1]) for k in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, k = [], 0
            while k < len(word):
                if k < len(word) - 1 and (word[k], word[k + 1]) == best:
                    merged.append(word[k] + word[k + 1])
                    k += 2
                else:
                    merged.append(word[k])
                    k += 1
            word = tuple(merged)
        return word

    def tokens(self, text: str) -> list[int]:
        """Token ids of ``text`` without the start and end tokens or padding."""
        ids = []
        for piece in pre_tokenize(text):
            if piece in (BOS, EOS):
                ids.append(self.vocab[piece])
                continue
            mapped = "".join(self.byte_map[b] for b in piece.encode("utf-8"))
            ids.extend(self.vocab[t] for t in self._bpe(mapped))
        return ids

    def encode(self, text: str, max_length: int = MAX_LENGTH) -> tuple[list[int], int]:
        """``max_length`` ids (start, tokens, end, padding) and how many tokens were cut off."""
        ids = self.tokens(text)
        room = max_length - 2
        dropped = max(0, len(ids) - room)
        ids = [self.bos, *ids[:room], self.eos]
        return ids + [self.pad] * (max_length - len(ids)), dropped
