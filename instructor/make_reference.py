"""
The reference values of the graded tests, computed by the solution:

    python -m instructor reference        (or: python -m instructor.make_reference)

writes unittests_ref.pt from this repository's gpt.py with a fixed seed: what `pytest unittests.py` checks
against on a student's machine. The file holds tensors and plain values only (loadable with
torch.load(weights_only=True)): a small model's weights, the inputs, and what each part of the solution
outputs for them. Regenerate it whenever the solution's numerics change, and commit it.

At grade time the grader sets unittests.SOURCE = GradeTimeInputs(<the solution's gpt.py>, key, submission):
every test then draws its inputs from a secret seed and checks against reference values computed by the
solution for weights and inputs drawn then, so that no submission can know them in advance. The seeds come
from the course's secret key (reference/key in the graders' folder) and the submitted files: the same files
always get the same inputs, so a regrade gives the same grade; other files get other inputs.
"""

import hashlib
import hmac
import importlib.util
import io
import os
import secrets

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_PATH = os.path.join(ROOT, "unittests_ref.pt")
SEED = 1234  # of the shipped reference values
# small enough to keep the file at a few hundred KB; T < block_size so that mask slicing is exercised
CONFIG = dict(vocab_size=23, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True,
              abs_emb=False, use_flash_attn=False, norm="layernorm")


def source_hash():
    """sha256 of the model's source: the reference values are only valid for the code they came from."""
    with open(os.path.join(ROOT, "gpt.py"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def draw_weights(model):
    """Weights that make every part matter: linear layers N(0, 1/fan_in) (outputs of the size of their
    inputs, attention far from uniform), biases N(0, 0.2), norms' weights N(1, 0.2), embeddings N(0, 0.3) (as
    the tests draw them)."""
    for name, p in model.named_parameters():  # the tied wte / lm_head matrix comes once
        if name.endswith("wte.weight") or name.endswith("wpe.weight"):
            p.normal_(0.0, 0.3)
        elif p.dim() == 2:
            p.normal_(0.0, p.size(1) ** -0.5)
        elif name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
            p.normal_(1.0, 0.2)
        else:
            p.normal_(0.0, 0.2)


@torch.no_grad()
def make_reference(gpt, seed):
    """The reference values: the solution's module gpt run on weights and inputs drawn from seed. The caller's
    torch RNG is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        B, T = int(torch.randint(2, 4, ())), int(torch.randint(6, CONFIG["block_size"], ()))  # B > 1: rows matter
        model = gpt.GPT(gpt.GPTConfig(**CONFIG)).eval()
        draw_weights(model)
        abs_model = gpt.GPT(gpt.GPTConfig(**{**CONFIG, "abs_emb": True})).eval()
        draw_weights(abs_model)  # for its wpe
        abs_model.load_state_dict(model.state_dict(), strict=False)  # the same weights plus its own wpe

        block = model.transformer.h[0]
        hs = CONFIG["n_embd"] // CONFIG["n_head"]
        x = torch.randn(B, T, CONFIG["n_embd"])  # (B, T, C)
        q = torch.randn(B, CONFIG["n_head"], T, hs)  # (B, nh, T, hs)
        offset = int(torch.randint(1, CONFIG["block_size"], ()))
        rms = gpt.RMSNorm(CONFIG["n_embd"])
        rms.weight.normal_(1.0, 0.2)
        idx = torch.randint(0, CONFIG["vocab_size"], (B, T))
        return {
            "config": CONFIG,
            "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
            "wpe": abs_model.transformer.wpe.weight.clone(),
            "x": x, "q": q, "idx": idx, "rotary_offset": offset,
            "rmsnorm_weight": rms.weight.clone(),
            "layernorm_out": block.ln_1(x),
            "rmsnorm_out": rms(x),
            "rotary_out": block.attn.rotary(q, offset=offset),
            "attn_probs": block.attn.attention_probs(q, q.flip(2)),
            "attn_out": block.attn(x),
            "mlp_out": block.mlp(x),
            "block_out": block(x),
            "logits": model(idx)[0],
            "abs_logits": abs_model(idx)[0],
        }


class GradeTimeInputs:
    """unittests.SOURCE at grade time: a secret seed for each test, and reference values computed by the
    solution's gpt.py (at solution_gpt_path) for secret weights and inputs, once per grading run. The seeds are
    keyed digests of the submission (bytes naming its files) when key (bytes) is given, else fresh random."""

    def __init__(self, solution_gpt_path, key=None, submission=b""):
        # a private name: in the grader `import gpt` is the student's module, in the jail
        spec = importlib.util.spec_from_file_location("_solution_gpt", solution_gpt_path)
        self.gpt = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.gpt)
        self.key, self.submission, self.values = key, submission, None

    def draw(self, what):
        """A 63-bit seed for `what` (a test's node id, or "reference")."""
        if self.key is None:
            return secrets.randbits(63)
        digest = hmac.new(self.key, self.submission + b"\0" + what.encode(), hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big") >> 1

    def seed(self, nodeid):
        return self.draw(nodeid)

    def reference(self):
        if self.values is None:
            self.values = make_reference(self.gpt, self.draw("reference"))
        return self.values


def main():
    import gpt  # here, so that `python -m instructor check` can report on a gpt.py that does not import
    from files import atomic_write

    buffer = io.BytesIO()
    torch.save({"source_sha256": source_hash(), **make_reference(gpt, SEED)}, buffer)
    atomic_write(REF_PATH, buffer.getvalue())
    print(f"wrote {REF_PATH} ({len(buffer.getvalue()) / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
