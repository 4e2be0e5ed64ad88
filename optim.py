"""
The optimizers and the learning-rate schedule of train.py.

- AdamW (`--optimizer adamw`), with weight decay on matrices only.
- Muon (`--optimizer muon`) for the blocks' matrices, AdamW for the rest (embeddings, which are also the
  tied output head, norms and biases), as the speedrun community trains GPTs. Muon replaces each matrix's
  momentum by the nearest semi-orthogonal matrix (U V^T of its SVD, found by a few Newton-Schulz
  iterations): every direction of the update gets the same size, so rare directions learn as fast as
  common ones. Its step is scaled to AdamW's typical update size, so one --learning_rate serves both.
"""

import itertools
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


def orthogonalize(batches, steps=5):
    """U V^T of each G = U S V^T, approximately, for a list of batches of matrices (k, m, n), each batch of one
    shape: a quintic Newton-Schulz iteration whose coefficients (Keller Jordan's) take every singular value of
    G / |G| to within ~0.3 of 1 in 5 steps, which is enough. Each step is X <- (a + b A + c A^2) X with
    A = X X^T; A stays a polynomial of the first one, so the iteration runs on the small square A alone and
    multiplies X once, at the end (a quarter fewer multiply-adds for our matrices). Batches whose A has the same
    size iterate as one: a 192-wide model's attention and MLP matrices all have a 192 x 192 A, so each step is
    a few large batched products instead of dozens of small ones (on a CPU each operation also pays to wake
    its threads)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    wide = [X.mT if X.size(1) > X.size(2) else X for X in batches]  # (k, m, n), m <= n: A is the smaller square
    out = [None] * len(batches)
    by_size = {}
    for i, X in enumerate(wide):
        by_size.setdefault(X.size(1), []).append(i)
    for members in by_size.values():
        # fp32: bf16 would be 50x slower on CPUs that lack it, and the Gram form wants the precision
        X = [wide[i].float() for i in members]
        A = torch.cat([x @ x.mT for x in X])  # (K, m, m)
        norm2 = A.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]  # trace(X X^T) = |X|^2, (K, 1, 1)
        A = A / (norm2 + 1e-14)  # of X / |X|: singular values <= 1
        P = None  # X_k = P X_0
        for step in range(steps):
            Q = torch.baddbmm(A, A, A, beta=b, alpha=c)  # X_k+1 = Q X_k, Q = a + b A + c A^2 symmetric
            Q.diagonal(dim1=1, dim2=2).add_(a)
            P = Q if P is None else Q @ P  # the first P is Q itself
            if step < steps - 1:  # the last step's A is never used
                A = Q @ A @ Q
        P = P / (norm2.sqrt() + 1e-7)  # X_0 = X / |X|
        for i, p, x in zip(members, P.split([len(x) for x in X]), X):
            y = p @ x
            out[i] = (y.mT if batches[i].size(1) > batches[i].size(2) else y).to(batches[i].dtype)
    return out


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update, per matrix, is orthogonalized; decoupled weight decay. A group's
    momentum buffers are views of one flat tensor, its matrices ordered by shape: the momentum updates once per
    step, and each shape's matrices are one batch for orthogonalize without copying."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.95):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))

    def flat_momentum(self, params):
        """The params' momentum buffers as one flat tensor (zeros where new), their states views of it: made on
        the first step, and again after load_state_dict (which gives each buffer a tensor of its own)."""
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        flat = getattr(bufs[0], "_base", None)
        if flat is not None and flat.numel() == sum(p.numel() for p in params) and all(
                buf is not None and buf._base is flat for buf in bufs):
            return flat
        flat = torch.cat([(torch.zeros_like(p) if buf is None else buf).reshape(-1) for p, buf in zip(params, bufs)])
        for p, buf in zip(params, flat.split([p.numel() for p in params])):
            self.state[p]["momentum_buffer"] = buf.view_as(p)
        return flat

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            params = sorted((p for p in group["params"] if p.grad is not None), key=lambda p: tuple(p.shape))
            if not params:
                continue
            buf = self.flat_momentum(params)
            grad = torch.cat([p.grad.reshape(-1) for p in params])
            buf.lerp_(grad, 1 - momentum)
            update = grad.lerp_(buf, momentum)  # Nesterov
            batches, offset = [], 0
            for shape, same in itertools.groupby(params, key=lambda p: p.shape):  # each shape: (k, m, n), no copy
                k = len(list(same))
                batches.append(update[offset:offset + k * shape.numel()].view(k, *shape))
                offset += k * shape.numel()
            orthogonal = [u for batch in orthogonalize(batches) for u in batch]
            for p, u in zip(params, orthogonal):
                # an orthogonal update has RMS 1/sqrt(max(m, n)); AdamW's is about 0.2
                scale = 0.2 * math.sqrt(max(p.shape))
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.add_(u, alpha=-lr * scale)


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
