"""
What travels between the grader and the jail (the process running student code), both ways.

A message is one frame: an 8-byte length, then a 4-byte header length, a JSON header and a safetensors
blob holding the tensors the header names. Values that travel: None, bool, int, float (inf and nan too),
str, list, tuple, dict with str keys, tensors, dtypes, devices, slices, `...`, paths (as str) and torch
Generators (their state). Anything else stays where it was made and travels as a handle, {"handle": id};
a tensor with a graph where it was made (a loss, a parameter) travels as its value and a handle,
{"tracked": [value, handle]}, so that backward() and .grad can reach the original.
Decoding runs no code from the message: json.loads, safetensors, and a fixed set of tags; a frame that is
too large, too deep or malformed raises WireError. This file is copied into the jail, which uses it too.
"""

import json
import math
import os
import struct
import time
from collections import OrderedDict

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

MAX_FRAME = 64 << 20  # bytes of one message: the tests exchange a few KB to a few hundred KB
MAX_HEADER = 1 << 20
MAX_DEPTH = 32
DTYPES = {str(t): t for t in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                              torch.int16, torch.int8, torch.uint8, torch.bool)}


class WireError(Exception):
    """A message that cannot be sent or that is not a well-formed answer."""


def pack(value, handle, track=False):
    """value -> bytes; handle(obj) -> a JSON-able handle for what is not a plain value (or raises WireError);
    track: tensors that require grad travel with a handle too."""
    tensors = {}

    def tensor(t):
        key = str(len(tensors))
        tensors[key] = t.detach().to("cpu").contiguous().clone()
        return key

    def enc(v, depth):
        if depth > MAX_DEPTH:
            raise WireError("value nested too deeply")
        if v is None or type(v) in (bool, int, str):
            return v
        if type(v) is float:
            return v if math.isfinite(v) else {"float": repr(v)}
        if type(v) in (list, tuple, torch.Size):
            return {"list" if type(v) is list else "tuple": [enc(x, depth + 1) for x in v]}
        if type(v) in (dict, OrderedDict) and all(type(k) is str for k in v):
            return {"dict": [[k, enc(x, depth + 1)] for k, x in v.items()]}
        if type(v) in (torch.Tensor, torch.nn.Parameter):
            if v.is_meta:
                return {"meta": list(v.shape), "dtype": str(v.dtype)}
            if str(v.dtype) not in DTYPES:
                raise WireError(f"tensors of {v.dtype} do not travel")
            if track and v.requires_grad:
                return {"tracked": [tensor(v), handle(v)]}
            return {"tensor": tensor(v)}
        if isinstance(v, torch.dtype):
            return {"dtype": str(v)}
        if isinstance(v, torch.device):
            return {"device": str(v)}
        if type(v) is torch.Generator:
            return {"generator": tensor(v.get_state())}
        if type(v) is slice:
            return {"slice": [enc(v.start, depth + 1), enc(v.stop, depth + 1), enc(v.step, depth + 1)]}
        if v is Ellipsis:
            return {"ellipsis": None}
        if isinstance(v, os.PathLike):
            return {"path": os.fspath(v)}
        return handle(v)

    header = json.dumps(enc(value, 0), allow_nan=False).encode()
    blob = save_tensors(tensors) if tensors else b""
    return struct.pack("<I", len(header)) + header + blob


def unpack(data, handle, tracked=None):
    """bytes -> value; handle(dict) -> the object a handle names; tracked(tensor, handle) -> what a tracked
    tensor becomes (None: tracked tensors are refused). Raises WireError on anything malformed."""
    try:
        (size,) = struct.unpack("<I", data[:4])
        if size > MAX_HEADER or 4 + size > len(data):
            raise WireError("bad header length")
        tree = json.loads(data[4:4 + size])
        tensors = load_tensors(bytes(data[4 + size:])) if len(data) > 4 + size else {}
    except WireError:
        raise
    except Exception as e:  # struct, JSON, safetensors, RecursionError: all just malformed
        raise WireError(f"malformed message ({type(e).__name__})") from None

    def tensor(key):
        if type(key) is not str or key not in tensors:
            raise WireError("a tensor the message does not hold")
        return tensors[key]

    def dec(v, depth):
        if depth > MAX_DEPTH:
            raise WireError("value nested too deeply")
        if v is None or type(v) in (bool, int, float, str):
            return v
        if type(v) is not dict or not v:
            raise WireError(f"unexpected {type(v).__name__} in a message")
        tag, arg = next(iter(v.items()))
        if tag == "handle":
            return handle(v)
        if len(v) != 1 and tag != "meta":
            raise WireError("unexpected keys in a message")
        if tag in ("list", "tuple") and type(arg) is list:
            items = [dec(x, depth + 1) for x in arg]
            return items if tag == "list" else tuple(items)
        if tag == "dict" and type(arg) is list and all(type(p) is list and len(p) == 2 and type(p[0]) is str
                                                       for p in arg):
            return {k: dec(x, depth + 1) for k, x in arg}
        if tag == "float" and arg in ("inf", "-inf", "nan"):
            return float(arg)
        if tag == "tensor":
            return tensor(arg)
        if tag == "tracked" and tracked is not None and type(arg) is list and len(arg) == 2 and type(arg[1]) is dict:
            return tracked(tensor(arg[0]), handle(arg[1]))
        if (tag == "meta" and type(arg) is list and all(type(n) is int and n >= 0 for n in arg)
                and v.get("dtype") in DTYPES):
            return torch.empty(arg, dtype=DTYPES[v["dtype"]], device="meta")
        if tag == "dtype" and arg in DTYPES:
            return DTYPES[arg]
        if tag == "device" and type(arg) is str and len(arg) < 32:
            return torch.device(arg)
        if tag == "generator":
            g = torch.Generator()
            g.set_state(tensor(arg))
            return g
        if tag == "slice" and type(arg) is list and len(arg) == 3:
            return slice(*(dec(x, depth + 1) for x in arg))
        if tag == "ellipsis":
            return Ellipsis
        if tag == "path" and type(arg) is str:
            return arg
        raise WireError(f"unknown tag {tag!r} in a message")

    try:
        return dec(tree, 0)
    except WireError:
        raise
    except Exception as e:  # e.g. a generator state or a device string torch refuses
        raise WireError(f"malformed message ({type(e).__name__}: {str(e)[:200]})") from None


def send(sock, data):
    if len(data) > MAX_FRAME:
        raise WireError(f"message of {len(data):,} bytes, more than {MAX_FRAME:,}")
    sock.sendall(struct.pack("<Q", len(data)) + data)


def recv(sock, deadline=None):
    """One frame from sock. Raises EOFError when the other side closed, TimeoutError after deadline
    (time.monotonic()), however slowly the bytes trickle in."""
    (size,) = struct.unpack("<Q", recv_exactly(sock, 8, deadline))
    if size > MAX_FRAME:
        raise WireError(f"message of {size:,} bytes, more than {MAX_FRAME:,}")
    return recv_exactly(sock, size, deadline)


def recv_exactly(sock, n, deadline):
    data = bytearray()
    while len(data) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
        chunk = sock.recv(min(n - len(data), 1 << 20))
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return bytes(data)
