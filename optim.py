"""
The optimizers and the learning-rate schedule of train.py.

- AdamW (`--optimizer adamw`), with weight decay on matrices only.
- Muon (`--optimizer muon`) for the blocks' matrices, AdamW for the rest (embeddings, which are also the
  tied output head, norms and biases), as the speedrun community trains GPTs. Muon replaces each matrix's
  momentum by the nearest semi-orthogonal matrix (U V^T of its SVD, found by a few Newton-Schulz
  iterations): every direction of the update gets the same size, so rare directions learn as fast as
  common ones. Its step is scaled to AdamW's typical update size, so one --learning_rate serves both.
"""

import math

import torch


def lr_at(step, cfg, max_steps):
    """Linear warmup (never 0, even at step 0), then either cosine decay from learning_rate to min_lr at
    max_steps, or (cfg.cooldown > 0) learning_rate held until the last cooldown fraction of the steps, then
    a linear decay to min_lr (warmup-stable-decay)."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if cfg.cooldown:
        cooldown_steps = max(1, round(cfg.cooldown * max_steps))
        progress = min(1.0, max(0.0, (step - (max_steps - cooldown_steps)) / cooldown_steps))
        return cfg.learning_rate + progress * (cfg.min_lr - cfg.learning_rate)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type, optimizer="adamw",
                         adamw_lr_scale=1.0):
    """AdamW with weight decay on matrices (Linear weights, embeddings) only, not on biases and norms; with
    optimizer="muon", Muon takes the matrices inside the blocks (transformer.h) and AdamW the rest, at
    adamw_lr_scale times the learning rate (each group's "lr_scale": train.py's schedule multiplies by it)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = [p for name, p in named if optimizer == "muon" and name.startswith("transformer.h.") and p.dim() == 2]
    rest = [p for _, p in named if not any(p is h for h in hidden)]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    # the fused kernel updates every parameter in one pass instead of ~10 operations per tensor
    # (on a CPU, 5 ms per step instead of 15-30 for the default model)
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))
    if optimizer == "adamw":
        return adamw
    for group in adamw.param_groups:
        group["lr_scale"] = adamw_lr_scale
    return Optimizers(Muon(hidden, lr=learning_rate, weight_decay=weight_decay), adamw)


def orthogonalize(matrices, steps=5):
    """U V^T of each G = U S V^T in a list of matrices, approximately: a quintic Newton-Schulz iteration whose
    coefficients (Keller Jordan's) take every singular value of G / |G| to within ~0.3 of 1 in 5 steps, which is
    enough. Each step is X <- (a + b A + c A^2) X with A = X X^T; A stays a polynomial of the first one, so the
    iteration runs on the small square A alone and multiplies X once, at the end (a quarter fewer multiply-adds
    for our matrices). Matrices whose A has the same size iterate together, as one batch: a block's four
    matrices of a 192-wide model all have a 192 x 192 A, so 20 batched products replace 80 small ones."""
    a, b, c = 3.4445, -4.7750, 2.0315
    out = [None] * len(matrices)
    by_size = {}
    for i, G in enumerate(matrices):
        by_size.setdefault(min(G.shape), []).append(i)
    for size, members in by_size.items():
        # fp32: bf16 would be 50x slower on CPUs that lack it, and the Gram form wants the precision
        X = [matrices[i].float() for i in members]
        X = [x.mT if x.size(0) > x.size(1) else x for x in X]  # (m, n), m <= n: A is the smaller square
        X = [x / (x.norm() + 1e-7) for x in X]  # singular values <= 1
        A = torch.stack([x @ x.mT for x in X])  # (k, m, m)
        eye = torch.eye(size, device=A.device)
        P = eye.expand_as(A)  # X_k = P X_0
        for _ in range(steps):
            Q = a * eye + b * A + c * A @ A  # X_k+1 = Q X_k, Q symmetric
            A, P = Q @ A @ Q, Q @ P
        for i, p, x in zip(members, P, X):
            y = p @ x
            out[i] = (y.mT if matrices[i].size(0) > matrices[i].size(1) else y).to(matrices[i].dtype)
    return out


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update, per matrix, is orthogonalized; decoupled weight decay."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.95):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            params = [p for p in group["params"] if p.grad is not None]
            nesterov = []
            for p in params:
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                nesterov.append(p.grad.lerp(buf, momentum))
            for p, update in zip(params, orthogonalize(nesterov)):
                # an orthogonal update has RMS 1/sqrt(max(m, n)); AdamW's is about 0.2
                scale = 0.2 * math.sqrt(max(p.shape))
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * scale)


class Optimizers:
    """Several optimizers stepped as one (what train.py and the fp16 GradScaler need of an optimizer): their
    param_groups in one list (setting a group's lr reaches its optimizer), one state_dict."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):  # read each time: load_state_dict replaces an optimizer's groups
        return [group for o in self.optimizers for group in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)
