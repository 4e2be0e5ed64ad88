"""
Regenerate unittests_ref.pt, the reference values of the graded tests, from this solution:

    python -m instructor reference        (or: python -m instructor.make_reference)

The file holds tensors and plain values only (loadable with torch.load(weights_only=True)): a small
seeded model's weights, the inputs, and what each block of the solution outputs for them.
Regenerate it whenever the solution's numerics change, and commit it.
"""

import hashlib
import io
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_PATH = os.path.join(ROOT, "unittests_ref.pt")
# small enough to keep the file at a few hundred KB; T < block_size so that mask slicing is exercised
CONFIG = dict(vocab_size=23, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True,
              abs_emb=False, use_flash_attn=False, norm="layernorm")
B, T = 2, 12


def source_hash():
    """sha256 of the model's source: the reference values are only valid for the code they came from."""
    with open(os.path.join(ROOT, "gpt.py"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@torch.no_grad()
def make_reference():
    import gpt  # here, so that `python -m instructor check` can report on a gpt.py that does not import

    torch.manual_seed(1234)
    model = gpt.GPT(gpt.GPTConfig(**CONFIG)).eval()
    for module in model.modules():  # non-trivial norm parameters, so that using them wrongly shows
        if isinstance(module, (gpt.LayerNorm, torch.nn.LayerNorm)):
            module.weight.normal_(1.0, 0.2)
            module.bias.normal_(0.0, 0.2)
    abs_model = gpt.GPT(gpt.GPTConfig(**{**CONFIG, "abs_emb": True})).eval()
    abs_model.load_state_dict(model.state_dict(), strict=False)  # same weights plus its own wpe
    wpe = abs_model.transformer.wpe.weight.clone()

    block = model.transformer.h[0]
    x = torch.randn(B, T, CONFIG["n_embd"])  # (B, T, C)
    hs = CONFIG["n_embd"] // CONFIG["n_head"]
    q = torch.randn(B, CONFIG["n_head"], T, hs)  # (B, nh, T, hs)
    rms = gpt.RMSNorm(CONFIG["n_embd"])
    rms.weight.normal_(1.0, 0.2)
    idx = torch.randint(0, CONFIG["vocab_size"], (B, T))
    targets = torch.randint(0, CONFIG["vocab_size"], (B, T))
    targets[0, :3] = -1  # ignored positions
    logits, loss = model(idx, targets)
    abs_logits, abs_loss = abs_model(idx, targets)
    return {
        "source_sha256": source_hash(),
        "config": CONFIG,
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
        "wpe": wpe,
        "x": x, "q": q, "idx": idx, "targets": targets,
        "rmsnorm_weight": rms.weight.clone(),
        "layernorm_out": block.ln_1(x),
        "rmsnorm_out": rms(x),
        "rotary_out": block.attn.rotary(q, offset=3),
        "attn_probs": block.attn.attention_probs(q, q.flip(2)),
        "attn_out": block.attn(x),
        "mlp_out": block.mlp(x),
        "block_out": block(x),
        "logits": logits, "loss": loss,
        "abs_logits": abs_logits, "abs_loss": abs_loss,
    }


def main():
    from dataset import atomic_write

    buffer = io.BytesIO()
    torch.save(make_reference(), buffer)
    atomic_write(REF_PATH, buffer.getvalue())
    print(f"wrote {REF_PATH} ({len(buffer.getvalue()) / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
