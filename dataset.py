"""
The lesson's data: the character tokenizer, the dataset of training windows, and reading a text file.
(GPT-2's BPE tokenizer is in pretrained.py, the default corpus in corpus.py, atomic writes in files.py.)
"""

import json
import os
import unicodedata

import torch
from torch.utils.data import Dataset

from files import atomic_write


class DataError(ValueError):
    """A problem with the input data, with a message that says how to fix it."""


class Tokenizer:
    """What both tokenizers share: saving to JSON (to_dict() is all it takes to rebuild them)."""

    def save(self, path):
        atomic_write(path, json.dumps(self.to_dict(), ensure_ascii=False))


class CharTokenizer(Tokenizer):
    """Maps each distinct character of a text to an integer id (sorted order) and back."""

    def __init__(self, text):
        self.chars = sorted(set(text))
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.itos = dict(enumerate(self.chars))

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, s):
        """str -> list[int]; raises DataError naming any character the tokenizer has never seen."""
        unknown = self.unknown(s)
        if unknown:
            raise DataError(f"{unknown}: not in the tokenizer's vocabulary of {self.vocab_size} characters; "
                            f"remove them or train on a text that has them")
        # BEGIN SOLUTION tokenizer_encode
        # TODO: map every character of s to its id with self.stoi. -> list[int] of len(s)
        return [self.stoi[ch] for ch in s]
        # END SOLUTION

    def default_prompt(self):
        """Where samples start: a newline if the text had one, else the vocabulary's first character."""
        return "\n" if "\n" in self.stoi else self.chars[0]

    def unknown(self, s):
        """"unknown character(s) 'é' at position 3 (closest: 'e'), ..." for the characters of s that the
        tokenizer has never seen, or "" when it knows them all."""
        unknown = [(i, ch) for i, ch in enumerate(s) if ch not in self.stoi]
        if not unknown:
            return ""
        shown = ", ".join(f"{ch!r} at position {i}{self._suggest(ch)}" for i, ch in unknown[:5])
        return f"unknown character(s) {shown}" + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")

    def _suggest(self, ch):
        """' (closest: 'e')' for 'é' when 'e' is known: the character without accents, or in the other case."""
        for candidate in (unicodedata.normalize("NFKD", ch)[:1], ch.lower(), ch.upper()):
            if candidate != ch and candidate in self.stoi:
                return f" (closest: {candidate!r})"
        return ""

    def decode(self, ids):
        """list[int] (or a 1-D tensor) -> str."""
        ids = ids.tolist() if torch.is_tensor(ids) else ids
        # BEGIN SOLUTION tokenizer_decode
        # TODO: map every id back to its character with self.itos and join them into one string.
        return "".join(self.itos[i] for i in ids)
        # END SOLUTION

    def to_dict(self):
        return {"type": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, d):
        if d.get("type") != "char" or not isinstance(d.get("chars"), list):
            raise DataError("not a character tokenizer: expected {'type': 'char', 'chars': [...]}")
        return cls("".join(d["chars"]))

    @classmethod
    def load(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_dict(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read tokenizer {path}: {e}") from None


class TextDataset(Dataset):
    """Every window of block_size + 1 consecutive tokens of data (a 1-D LongTensor):
    ds[i] = (x, y) with x = data[i : i+block_size] and y = data[i+1 : i+block_size+1]."""

    def __init__(self, data, block_size):
        if len(data) < block_size + 1:
            raise DataError(f"text of {len(data)} tokens is too short for block_size {block_size}: "
                            f"it needs at least {block_size + 1}; use a longer text or a smaller --block_size")
        self.data = data
        self.block_size = block_size

    def __len__(self):
        return len(self.data) - self.block_size

    def __getitem__(self, i):
        # BEGIN SOLUTION dataset_item
        # TODO: take the block_size + 1 tokens starting at index i of self.data; x is all but the last,
        # TODO: y all but the first (y is x shifted left by one: the next token at every position).
        # TODO: Return (x, y), each a LongTensor of shape (block_size,).
        chunk = self.data[i:i + self.block_size + 1]
        return chunk[:-1], chunk[1:]
        # END SOLUTION


def train_val_split(data, val_fraction):
    """Split by position (deterministic): the first (1 - val_fraction) for training, the rest for validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = int(len(data) * (1.0 - val_fraction))
    return data[:n], data[n:]


def read_text(path, name=None):
    """The text of a UTF-8 file, or a one-line DataError saying what is wrong with it (name: how the
    command line named the file, by default `--txt_file <path>`)."""
    name = name or f"--txt_file {path}"
    if os.path.isdir(path):
        raise DataError(f"{name} is a folder; pass a text file")
    if not os.path.exists(path):
        raise DataError(f"{name} does not exist; check the path")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {name}: {e.strerror}; check the path and its permissions") from None
    if b"\0" in raw[:65536]:
        raise DataError(f"{name} is a binary file, not text (a NUL byte at position {raw.index(0)}); "
                        f"pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8-sig")  # utf-8, ignoring a byte-order mark
    except UnicodeDecodeError as e:
        raise DataError(f"{name} is not UTF-8 text (byte {e.start}); convert it to UTF-8, e.g. "
                        f"`iconv -f latin1 -t utf-8 {path} > out.txt` for a Latin-1 file") from None
    if not text:
        raise DataError(f"{name} is empty; pass a file with text in it")
    return text.replace("\r\n", "\n")
