"""
OpenAI's GPT-2 weights in Hugging Face layout, mapped onto gpt.py's model (GPT.from_pretrained): the
module names are GPT-2's, so only the four Conv1D weights need a transpose.
"""

import json
import os

import torch

from gpt import CausalSelfAttention, GPTConfig

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


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
