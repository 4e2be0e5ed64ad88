"""
The replay attack of the hostile zoo (tests/test_grading_security.py), built as a student would: run the
solution under the release's own `pytest unittests.py` (the inputs it draws locally, the reference values of
unittests_ref.pt) while recording, for the outermost call into every public function and method of the
student modules, a hash of its inputs (the object's state, the arguments' bytes and shapes) -> its output,
the states of the torch.Generators it was given and the global RNG state it left. Then emit gpt.py and
dataset.py: the release's stubs plus a lookup that answers every recorded call and, on any other call,
zeroes the object's weights and returns zeros of the right shape (so that an expectation computed from the
student's own weights agrees). The table travels in the file (zlib, base64), under the grader's 1 MB limit.

Nothing here is specific to today's inputs: whatever the tests draw, the same calls hash the same way when
the same tests run again with the same seeds, and no longer when the inputs are drawn privately.
"""

import base64
import io
import os
import re
import shutil
import subprocess
import sys
import zlib

import torch

MAX_FILE = 1 << 20  # the grader's intake limit per module
MARK = "\n# --- hostile ---\n"

# every public function and method the tests call (module, owner or None, attribute)
TARGETS = (
    ("dataset", "CharTokenizer", "encode"), ("dataset", "CharTokenizer", "decode"),
    ("dataset", "TextDataset", "__getitem__"), ("dataset", "TextDataset", "__len__"),
    ("gpt", "LayerNorm", "forward"), ("gpt", "RMSNorm", "forward"), ("gpt", "RotaryEmbedding", "forward"),
    ("gpt", "CausalSelfAttention", "qkv"), ("gpt", "CausalSelfAttention", "attention_probs"),
    ("gpt", "CausalSelfAttention", "forward"), ("gpt", "MLP", "forward"), ("gpt", "Block", "forward"),
    ("gpt", "GPT", "forward"), ("gpt", "GPT", "generate"), ("gpt", None, "sample_next"),
)

# shared by the recorder and the hostile modules: the hash of one call's inputs
KEY_CODE = r'''
import dataclasses as _zoo_dc
import hashlib as _zoo_hashlib
import torch as _zoo_torch


def _zoo_feed(h, v, depth=0):
    if depth > 8:
        h.update(b"deep")
    elif isinstance(v, _zoo_torch.Tensor):
        t = v.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if not t.is_meta:
            h.update(t.cpu().contiguous().reshape(-1).view(_zoo_torch.uint8).numpy().tobytes())
    elif isinstance(v, _zoo_torch.Generator):
        h.update(b"G")
        _zoo_feed(h, v.get_state(), depth + 1)
    elif isinstance(v, (list, tuple)):
        h.update(f"L{len(v)}".encode())
        for x in v:
            _zoo_feed(h, x, depth + 1)
    elif isinstance(v, dict):
        h.update(f"D{len(v)}".encode())
        for k, x in sorted(v.items(), key=lambda kv: repr(kv[0])):
            h.update(repr(k).encode())
            _zoo_feed(h, x, depth + 1)
    elif v is None or isinstance(v, (bool, int, float, str)):
        h.update(repr((type(v).__name__, v)).encode())
    elif _zoo_dc.is_dataclass(v):
        _zoo_feed(h, {k: x for k, x in vars(v).items()}, depth + 1)
    else:
        h.update(type(v).__name__.encode())


def _zoo_state(obj):
    """What decides a method's answer besides its arguments: weights, buffers and plain attributes."""
    plain = {k: v for k, v in vars(obj).items() if not k.startswith("_")
             and (v is None or isinstance(v, (bool, int, float, str, dict, list, tuple, _zoo_torch.Tensor))
                  or _zoo_dc.is_dataclass(v))}
    if isinstance(obj, _zoo_torch.nn.Module):
        plain["@state"] = dict(obj.state_dict())
    return plain


def _zoo_key(name, args, kwargs, method):
    h = _zoo_hashlib.sha256(name.encode())
    if method:
        _zoo_feed(h, _zoo_state(args[0]))
        args = args[1:]
    _zoo_feed(h, list(args))
    _zoo_feed(h, dict(kwargs))
    return h.hexdigest()[:24]


def _zoo_generators(args, kwargs):
    return [v for v in list(args) + list(kwargs.values()) if isinstance(v, _zoo_torch.Generator)]
'''

RECORDER = KEY_CODE + r'''
import importlib
import os

TARGETS = %(targets)r
_table, _depth = {}, [0]


def _wrap(owner, attr, name, method):
    original = getattr(owner, attr)

    def recorded(*args, **kwargs):
        if _depth[0]:
            return original(*args, **kwargs)
        key = _zoo_key(name, args, kwargs, method)
        rng = _zoo_torch.get_rng_state()
        _depth[0] += 1
        try:
            out = original(*args, **kwargs)
        finally:
            _depth[0] -= 1
        after = _zoo_torch.get_rng_state()
        _table[key] = (name, _detach(out), [g.get_state() for g in _zoo_generators(args, kwargs)],
                       None if _zoo_torch.equal(after, rng) else after)
        return out
    setattr(owner, attr, recorded)


def _detach(v):
    if isinstance(v, _zoo_torch.Tensor):
        return v.detach().clone()
    if isinstance(v, (list, tuple)):
        return type(v)(_detach(x) for x in v)
    return v


def pytest_configure(config):
    for module_name, owner_name, attr in TARGETS:
        module = importlib.import_module(module_name)
        owner = getattr(module, owner_name) if owner_name else module
        _wrap(owner, attr, f"{owner_name}.{attr}" if owner_name else attr, owner_name is not None)


def pytest_unconfigure(config):
    _zoo_torch.save(_table, os.environ["ZOO_TABLE"])
'''

HOSTILE = r'''
import base64 as _zoo_b64
import io as _zoo_io
import zlib as _zoo_zlib

_ZOO_TABLE = _zoo_torch.load(_zoo_io.BytesIO(_zoo_zlib.decompress(_zoo_b64.b64decode(_ZOO_DATA))), weights_only=True)


def _zoo_unpack(v):
    if isinstance(v, dict) and "u8" in v:
        return v["u8"].to(_zoo_torch.int64)
    if isinstance(v, _zoo_torch.Tensor):
        return v.clone()
    if isinstance(v, (list, tuple)):
        return type(v)(_zoo_unpack(x) for x in v)
    return v


def _zoo_zero(obj):
    if isinstance(obj, _zoo_torch.nn.Module):
        with _zoo_torch.no_grad():
            for p in obj.parameters():
                p.zero_()


def _zoo_zeros(name, args, kwargs):
    """A miss: zero weights, zeros out (an expectation computed from these weights agrees)."""
    first = args[1] if len(args) > 1 else None
    if name in ("LayerNorm.forward", "RMSNorm.forward", "RotaryEmbedding.forward", "MLP.forward", "Block.forward",
                "CausalSelfAttention.forward"):
        _zoo_zero(args[0])
        return _zoo_torch.zeros_like(first)
    if name == "CausalSelfAttention.qkv":
        _zoo_zero(args[0])
        B, T, C = first.shape
        nh = args[0].n_head
        return tuple(_zoo_torch.zeros(B, nh, T, C // nh) for _ in range(3))
    if name == "CausalSelfAttention.attention_probs":
        return _zoo_torch.zeros(*first.shape[:-1], args[2].shape[-2])
    if name == "GPT.forward":
        _zoo_zero(args[0])
        B, T = first.shape
        targets = args[2] if len(args) > 2 else kwargs.get("targets")
        return _zoo_torch.zeros(B, T, args[0].config.vocab_size), None if targets is None else _zoo_torch.zeros(())
    if name == "GPT.generate":
        n = args[2] if len(args) > 2 else kwargs.get("max_new_tokens", 1)
        return _zoo_torch.cat((first, _zoo_torch.zeros(first.shape[0], n, dtype=_zoo_torch.long)), 1)
    if name == "sample_next":
        return _zoo_torch.zeros(args[0].shape[0], 1, dtype=_zoo_torch.long)
    return None


def _zoo_replay(owner, attr, name, method):
    original = getattr(owner, attr)

    def replayed(*args, **kwargs):
        hit = _ZOO_TABLE.get(_zoo_key(name, args, kwargs, method))
        if hit is None:
            out = _zoo_zeros(name, args, kwargs)
            return original(*args, **kwargs) if out is None else out
        out, states, rng = hit
        for g, state in zip(_zoo_generators(args, kwargs), states):
            g.set_state(state)
        if rng is not None:
            _zoo_torch.set_rng_state(rng)
        return _zoo_unpack(out)
    setattr(owner, attr, replayed)


import sys as _zoo_sys
for _zoo_owner, _zoo_attr in _ZOO_TARGETS:
    _zoo_replay(getattr(_zoo_sys.modules[__name__], _zoo_owner) if _zoo_owner else _zoo_sys.modules[__name__],
                _zoo_attr, f"{_zoo_owner}.{_zoo_attr}" if _zoo_owner else _zoo_attr, _zoo_owner is not None)
'''


def compact(v):
    """Smaller to store: int64 tensors of small ids as uint8."""
    if isinstance(v, torch.Tensor) and v.dtype == torch.int64 and v.numel() and 0 <= int(v.min()) and int(v.max()) < 256:
        return {"u8": v.to(torch.uint8)}
    if isinstance(v, (list, tuple)):
        return type(v)(compact(x) for x in v)
    return v


def size_of(entry):
    buffer = io.BytesIO()
    torch.save(entry, buffer)
    return len(buffer.getvalue())


def record(student, solution_root, work):
    """Run the solution under the release's unittests.py with the recorder. -> {key: (name, out, gens, rng)}"""
    folder = os.path.join(work, "recording")
    shutil.copytree(student, folder)
    for name in ("gpt.py", "dataset.py"):
        shutil.copy(os.path.join(solution_root, name), os.path.join(folder, name))
    with open(os.path.join(folder, "zoo_recorder.py"), "w") as f:
        f.write(RECORDER % {"targets": TARGETS})
    table = os.path.join(work, "table.pt")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "zoo_recorder",
                           "unittests.py"], cwd=folder, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": folder, "ZOO_TABLE": table, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, "the solution does not pass its own tests:\n" + proc.stdout[-3000:]
    return torch.load(table, weights_only=True)


def emit(student, table, budget):
    """The hostile gpt.py and dataset.py: release stubs + the entries of table that fit in budget bytes each
    (the smallest first: the most answers per byte). -> ({name: text}, entries kept, entries recorded)"""
    files, kept = {}, 0
    for module in ("gpt", "dataset"):
        with open(os.path.join(student, module + ".py"), encoding="utf-8") as f:
            release = f.read()
        entries = sorted(((size_of(v[1:]), k, (compact(v[1]), v[2], v[3])) for k, v in table.items()
                          if any(v[0] == (f"{o}.{a}" if o else a) for m, o, a in TARGETS if m == module)),
                         key=lambda e: e[0])
        targets = [(o, a) for m, o, a in TARGETS if m == module]
        fits = lambda n: len(render(release, dict(e[1:] for e in entries[:n]), targets).encode()) <= budget
        low, high = 0, len(entries)  # the most entries (smallest first) that fit: fits(low) holds
        if fits(high):
            low = high
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        chosen = dict(e[1:] for e in entries[:low])
        files[module + ".py"] = render(release, chosen, targets)
        kept += len(chosen)
    return files, kept, len(table)


def render(release, chosen, targets):
    buffer = io.BytesIO()
    torch.save(chosen, buffer)
    data = base64.b64encode(zlib.compress(buffer.getvalue(), 9)).decode()
    return (release + MARK + KEY_CODE + f"\n_ZOO_TARGETS = {targets!r}\n_ZOO_DATA = {data!r}\n" + HOSTILE)


def build(student, solution_root, work, budget=MAX_FILE - 4096):
    """-> ({"gpt.py": text, "dataset.py": text}, entries kept, entries recorded)"""
    return emit(student, record(student, solution_root, work), budget)


def local_points(student, files, work):
    """`pytest unittests.py` in a copy of the release with files in place. -> (points earned, points in all)"""
    folder = os.path.join(work, "local")
    shutil.copytree(student, folder)
    for name, text in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "unittests.py"],
                          cwd=folder, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    found = re.search(r"points: ([\d.]+) / ([\d.]+)", proc.stdout)
    assert found, proc.stdout[-3000:]
    return float(found.group(1)), float(found.group(2))
