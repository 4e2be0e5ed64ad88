"""
Sample text from a model trained with train.py, or from OpenAI's pretrained GPT-2.

    python generate.py --checkpoint runs/tinyshakespeare-baby --prompt "ROMEO:"
    python generate.py --pretrained gpt2 --prompt "Hello, my name is" --num_samples 3 --top_p 0.9
    python generate.py --checkpoint runs/mine/best.pt --prompt FILE:prompt.txt --output samples.txt

All options: `python generate.py --help` (cfg.py). Generation uses a KV cache (--no-kv_cache turns it
off; the tokens are the same). A model with learned positions attends to the last block_size tokens:
longer samples slide that window, as rotary models do. Exit codes: 0 done, 2 bad option or input.
"""

import os
import sys

import torch

from cfg import parse_sample_config
from dataset import DataError, GPT2Tokenizer, atomic_write, read_text, tokenizer_from_dict
from gpt import GPT, GPTConfig, pretrained_folder

SEPARATOR = "\n" + "-" * 30 + " sample {i} of {n} " + "-" * 30 + "\n"


def checkpoint_path(source):
    """A checkpoint file, or a run folder's best.pt, else its last.pt."""
    if os.path.isdir(source):
        for name in ("best.pt", "last.pt"):
            if os.path.isfile(os.path.join(source, name)):
                return os.path.join(source, name)
        raise DataError(f"{source} holds no best.pt or last.pt; pass a run folder of train.py or a .pt file")
    if not os.path.isfile(source):
        raise DataError(f"checkpoint {source} does not exist; pass a run folder of train.py or a .pt file")
    return source


def load_model(cfg):
    """-> (model in eval mode on cfg.device, tokenizer)."""
    if cfg.pretrained:
        folder = pretrained_folder(cfg.pretrained)  # the weights and the BPE files
        model = GPT.from_pretrained(folder)
        tokenizer = GPT2Tokenizer(folder)
    else:
        path = checkpoint_path(cfg.checkpoint)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated file, not a zip, or pickled objects weights_only refuses
            raise DataError(f"cannot read checkpoint {path} ({type(e).__name__}); it is corrupt or not a "
                            f"PyTorch checkpoint: pass a best.pt or last.pt written by train.py") from None
        if not isinstance(ckpt, dict) or not {"model", "model_config", "tokenizer"} <= ckpt.keys():
            raise DataError(f"{path} is not a Micro-GPT checkpoint (no model, model_config and tokenizer); "
                            f"pass one written by train.py, or a GPT-2 with --pretrained")
        model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    return model.to(device=cfg.device, dtype=dtype).eval(), tokenizer


def prompt_text(cfg, is_gpt2):
    if cfg.prompt is None:  # GPT-2 starts documents after <|endoftext|>; character models after a newline
        return "<|endoftext|>" if is_gpt2 else "\n"
    text = read_text(cfg.prompt[len("FILE:"):]) if cfg.prompt.startswith("FILE:") else cfg.prompt
    if not text:
        raise DataError("the prompt is empty; give some text, or leave --prompt out for the default")
    return text


def main(argv=None):
    try:
        cfg = parse_sample_config(argv)
        model, tokenizer = load_model(cfg)
        is_gpt2 = isinstance(tokenizer, GPT2Tokenizer)
        prompt = prompt_text(cfg, is_gpt2)
        ids = tokenizer.encode(prompt)
    except (ValueError, OSError) as e:  # DataError and GPTConfig's errors are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop = tokenizer.eot_token if is_gpt2 and cfg.stop_at_eot else None
    generator = torch.Generator(cfg.device).manual_seed(cfg.seed)
    options = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=generator,
                   kv_cache=cfg.kv_cache)
    # --stream prints each sample as it grows, so samples are made one after another; otherwise together
    batches = [1] * cfg.num_samples if cfg.stream else [cfg.num_samples]
    samples = []
    for batch in batches:
        if cfg.stream:
            print(SEPARATOR.format(i=len(samples) + 1, n=cfg.num_samples) + prompt, end="", flush=True)
        idx = torch.tensor([ids] * batch, dtype=torch.long, device=cfg.device)
        samples += sample(model, tokenizer, idx, cfg.max_new_tokens, options, stop, stream=cfg.stream)
    text = "".join(SEPARATOR.format(i=i + 1, n=len(samples)) + prompt + s for i, s in enumerate(samples)) + "\n"
    print("\n" if cfg.stream else text, end="")
    if cfg.output:
        atomic_write(cfg.output, text)
    return 0


def sample(model, tokenizer, idx, max_new_tokens, options, stop=None, stream=False):
    """Continue every row of idx (B, T) -> B decoded continuations, each ending before `stop` if it comes.
    With stream, row 0's text is printed as it grows."""
    rows, done, shown = [[] for _ in range(len(idx))], [False] * len(idx), 0
    for token in model.stream(idx, max_new_tokens, **options):
        for row, t in enumerate(token[:, 0].tolist()):
            done[row] = done[row] or t == stop
            if not done[row]:
                rows[row].append(t)
        if stream:
            text = tokenizer.decode(rows[0])
            if not text.endswith("\ufffd"):  # a BPE token can end inside a character: wait for the rest
                print(text[shown:], end="", flush=True)
                shown = len(text)
        if all(done):
            break
    return [tokenizer.decode(row) for row in rows]


if __name__ == "__main__":
    sys.exit(main())
