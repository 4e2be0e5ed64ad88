"""
Files written whole or not at all: every file the project writes (checkpoints, logs' companions, samples,
pictures, the grader's results) goes through atomic_write, so a crash, a kill or a full disk never leaves a
half-written file and never loses the previous one.
"""

import errno
import os
import tempfile
import time

TMP_SUFFIX = ".tmp"  # temporary files are .<name>.<random>.tmp beside their target
REPLACE_TRIES = 20  # Windows refuses to replace a file another program holds open: retry for about 5 s


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp's own is 0600)


def atomic_write(path, data, mode=FILE_MODE):
    """Write data (bytes, str, or a function that writes to a binary file) to path through a temporary
    file in the same folder, fsync and rename: a crash or a full disk never leaves a half-written file,
    and an existing file at path stays as it was unless the new one is complete. Raises OSError."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
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
        os.chmod(tmp, mode)
        replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file: name the target
            raise OSError(e.errno, e.strerror, path) from None
        raise


def replace(tmp, path):
    """os.replace, retried while another program holds path open (Windows: an editor, a viewer, a virus
    scanner); then one PermissionError naming path and what to do."""
    for attempt in range(REPLACE_TRIES):
        try:
            return os.replace(tmp, path)
        except PermissionError:
            if attempt == REPLACE_TRIES - 1 or os.path.isdir(path):
                raise PermissionError(errno.EACCES, "another program holds it open or it is read-only "
                                      "(close the program, or make it writable)", path) from None
            time.sleep(0.25)


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
