"""
A GPT-2 style decoder-only transformer, in the order data flows through it: config, norms, rotary position
embedding, causal self-attention, MLP, Block, GPT, sampling. Module and parameter names follow GPT-2
(transformer.wte, transformer.h.0.attn.c_attn, ...), so GPT-2's weights load onto it (GPT.from_pretrained).
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    """Everything that defines the model's shape; plain types only, so it saves as JSON."""

    vocab_size: int = 65
    block_size: int = 256  # longest context the model attends to
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and norms, as in GPT-2
    abs_emb: bool = False  # True: learned absolute positions (GPT-2); False: rotary (RoPE)
    use_flash_attn: bool = True  # F.scaled_dot_product_attention instead of the manual path
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    fused_norm: bool = True  # PyTorch's norm kernels instead of the hand-written LayerNorm / RMSNorm math
    rope_base: float = 10000.0

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not self.abs_emb and (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"rotary embedding needs an even head size, got n_embd/n_head = "
                             f"{self.n_embd // self.n_head}; change n_embd or n_head, or use abs_emb")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.rope_base <= 0:
            raise ValueError(f"rope_base must be positive, got {self.rope_base}")

    @classmethod
    def from_dict(cls, d):
        """Build from a plain dict (e.g. a checkpoint's), ignoring keys that are not config fields."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last dim, written out. The model uses nn.LayerNorm
    (one kernel instead of seven operations) unless GPTConfig.fused_norm is False."""

    def __init__(self, ndim, bias=True, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x):
        # BEGIN SOLUTION layernorm
        # TODO: normalise x over its last dimension without F.layer_norm: mean and biased
        # TODO variance (unbiased=False) over dim -1 with keepdim=True, then (x - mean) / sqrt(var + self.eps),
        # TODO times self.weight, plus self.bias when it is not None. Same shape as x.
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        y = (x - mean) * torch.rsqrt(var + self.eps) * self.weight
        return y + self.bias if self.bias is not None else y
        # END SOLUTION


class RMSNorm(nn.Module):
    """Root-mean-square norm (LLaMA's): y = x / sqrt(mean(x^2) + eps) * weight, no centring, no bias. The model
    uses nn.RMSNorm unless GPTConfig.fused_norm is False."""

    def __init__(self, ndim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.eps = eps

    def forward(self, x):
        # BEGIN SOLUTION rmsnorm
        # TODO: divide x by the root mean square of its last dimension, sqrt(mean(x**2) + self.eps)
        # TODO (mean over dim -1, keepdim=True), then multiply by self.weight. Same shape as x.
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight
        # END SOLUTION


def make_norm(config):
    """The block's norm; PyTorch's modules have the same parameters (weight, bias), hence the same checkpoints."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=1e-5) if config.fused_norm else RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias) if config.fused_norm else LayerNorm(config.n_embd, config.bias)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE, half-split convention of GPT-NeoX / LLaMA). Channel i of the first half
    and channel i of the second half form a pair, rotated by the angle pos * base^(-2i/hs). Rotating q and k
    makes q_m . k_n depend only on the distance m - n."""

    def __init__(self, head_size, base=10000.0):
        super().__init__()
        self.head_size, self.base = head_size, base

    def forward(self, x, offset=0):
        """x: (B, nh, T, hs) for positions offset .. offset+T-1 -> rotated x, same shape and dtype."""
        # the angles, always in fp32 (in bf16 the angles of far positions would be rounded); cheap to compute
        inv_freq = self.base ** (-torch.arange(0, self.head_size, 2, device=x.device) / self.head_size)  # (hs/2,)
        angles = torch.outer(torch.arange(offset, offset + x.size(-2), device=x.device).float(), inv_freq)  # (T, hs/2)
        cos, sin = angles.cos(), angles.sin()
        # BEGIN SOLUTION rotary
        # TODO: split x (in fp32: x.float()) into halves x1, x2 along the last dim (each (B, nh, T, hs/2)),
        # TODO: rotate each pair: (x1 * cos - x2 * sin, x1 * sin + x2 * cos), concatenate the two
        # TODO: results along the last dim back to (B, nh, T, hs) and return it in x's dtype (.type_as(x)).
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return rotated.type_as(x)
        # END SOLUTION


class KVCache:
    """Keys and values of every layer for the positions processed so far: with it, GPT.forward computes q, k, v
    of the new tokens only (positions length, length + 1, ...) and attends to the cached ones too."""

    def __init__(self, config, batch_size, device, dtype):
        hs = config.n_embd // config.n_head
        self.kv = torch.empty(config.n_layer, 2, batch_size, config.n_head, config.block_size, hs, device=device,
                              dtype=dtype)  # per layer: keys and values, (B, nh, block_size, hs) each
        self.length = 0  # positions filled so far; GPT.forward advances it

    def update(self, layer, k, v):
        """Store a layer's k, v (B, nh, T, hs) of new positions -> all its k, v so far, (B, nh, length + T, hs)."""
        end = self.length + k.size(2)
        self.kv[layer, 0, :, :, self.length:end] = k
        self.kv[layer, 1, :, :, self.length:end] = v
        return self.kv[layer, 0, :, :, :end], self.kv[layer, 1, :, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head masked self-attention: each position attends to itself and the positions before it."""

    def __init__(self, config, layer=0):
        super().__init__()
        self.layer = layer  # its index among the blocks: where its keys and values go in a KVCache
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.dropout, self.use_flash_attn = config.dropout, config.use_flash_attn
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.rotary = None if config.abs_emb else RotaryEmbedding(config.n_embd // config.n_head, config.rope_base)
        mask = torch.ones(config.block_size, config.block_size, dtype=torch.bool).tril()  # query i sees key j <= i
        self.register_buffer("mask", mask, persistent=False)

    def qkv(self, x):
        """x: (B, T, C) -> q, k, v, each (B, nh, T, hs) with hs = C // nh."""
        B, T, C = x.size()
        # BEGIN SOLUTION attn_qkv
        # TODO: project x with self.c_attn to (B, T, 3C) and split it into q, k, v of (B, T, C) each;
        # TODO: then view each as (B, T, self.n_head, hs) and transpose dims 1 and 2 to (B, nh, T, hs).
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        # END SOLUTION
        return q, k, v

    def attention_scores(self, q, k):
        """q (B, nh, Tq, hs), k (B, nh, Tk, hs) -> scores (B, nh, Tq, Tk): how well each query matches each key."""
        # BEGIN SOLUTION attn_scores
        # TODO: q @ k^T (transpose k's last two dims), times 1 / sqrt(hs), hs = k.size(-1). -> (B, nh, Tq, Tk)
        return (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        # END SOLUTION

    def causal_mask(self, att):
        """Scores (B, nh, Tq, Tk) -> the future hidden; the queries are the last Tq of the Tk positions."""
        Tq, Tk = att.shape[-2:]
        offset = Tk - Tq  # position of the first query (keys before it come from a KV cache; 0 in training)
        # BEGIN SOLUTION attn_mask
        # TODO: where self.mask[offset:offset + Tq, :Tk] is False (the rows of the queries' positions;
        # TODO: [:T, :T] in training), set att to float("-inf") (att.masked_fill). -> (B, nh, Tq, Tk)
        return att.masked_fill(~self.mask[offset:offset + Tq, :Tk], float("-inf"))
        # END SOLUTION

    def attention_probs(self, q, k):
        """Manual path: q (B, nh, Tq, hs), k (B, nh, Tk, hs) -> causal attention probabilities (B, nh, Tq, Tk)."""
        att = self.causal_mask(self.attention_scores(q, k))
        # BEGIN SOLUTION attn_softmax
        # TODO: turn each row of scores into probabilities: softmax over the last dim (keys). (B, nh, Tq, Tk)
        return F.softmax(att, dim=-1)
        # END SOLUTION

    def forward(self, x, cache=None):
        """x: (B, T, C) -> (B, T, C). With a KVCache, x holds the T newest positions only."""
        B, T, C = x.size()
        q, k, v = self.qkv(x)  # (B, nh, T, hs) each
        offset = 0 if cache is None else cache.length  # position of x's first token
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, offset + T, hs): every position so far
        if self.use_flash_attn and offset == 0:  # (is_causal aligns the mask to the first key: no cache)
            # BEGIN SOLUTION attn_flash
            # TODO: the same attention in one fused kernel: F.scaled_dot_product_attention(q, k, v) with
            # TODO: is_causal=True and dropout_p=self.dropout while training (0.0 in eval). -> (B, nh, T, hs)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True)
            # END SOLUTION
        else:
            att = self.attention_probs(q, k)  # (B, nh, T, offset + T)
            # BEGIN SOLUTION attn_values
            # TODO: apply self.attn_dropout to att, then take the weighted sum of values: att @ v -> (B, nh, T, hs)
            y = self.attn_dropout(att) @ v
            # END SOLUTION
        # BEGIN SOLUTION attn_out
        # TODO: put the heads side by side again: transpose y to (B, T, nh, hs), make it contiguous and
        # TODO: view it as (B, T, C); then project with self.c_proj and apply self.resid_dropout. -> (B, T, C)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))
        # END SOLUTION


class MLP(nn.Module):
    """Position-wise feed-forward network: C -> 4C -> GELU (tanh approximation, as GPT-2) -> C."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # BEGIN SOLUTION mlp
        # TODO: x (B, T, C) -> self.c_fc (B, T, 4C) -> self.gelu -> self.c_proj (B, T, C) -> self.dropout.
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))
        # END SOLUTION


class Block(nn.Module):
    """Transformer block with pre-norm residual connections (GPT-2)."""

    def __init__(self, config, layer=0):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        # BEGIN SOLUTION block
        # TODO: two residual branches, each normalising its input first (pre-norm): add to x what self.attn
        # TODO: makes of self.ln_1(x) (passing cache on: self.attn(..., cache)); then add to that what self.mlp
        # TODO: makes of its self.ln_2. (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x
        # END SOLUTION


class GPT(nn.Module):
    """The language model: token (+ position) embeddings, n_layer Blocks, final norm, lm_head."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd) if config.abs_emb else None,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (GPT-2): one matrix for both
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections: the residual stream's variance stays put with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):  # GPT-2's: weights from N(0, 0.02), zero biases
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def num_params(self):
        """Number of parameters (the tied wte/lm_head matrix counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, cache=None):
        """idx: (B, T) token ids; targets: (B, T) or None (-1 = ignore); cache: a KVCache of the positions before
        idx's, or None -> logits (B, T, vocab_size) and the mean cross-entropy loss (None without targets)."""
        B, T = idx.size()
        offset = 0 if cache is None else cache.length  # position of idx's first token
        if offset + T > self.config.block_size:
            raise ValueError(f"sequence length {offset + T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(offset, offset + T, device=idx.device)  # (T,) the positions of idx's tokens
        # BEGIN SOLUTION gpt_embed
        # TODO: token embeddings self.transformer.wte(idx) (B, T, C); with learned positions (self.transformer.wpe
        # TODO: is not None) add wpe(pos), (T, C) broadcast over the batch; then self.transformer.drop. -> x (B, T, C)
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.transformer.wpe is not None:
            x = x + self.transformer.wpe(pos)  # (T, C) broadcast over the batch
        x = self.transformer.drop(x)
        # END SOLUTION
        # BEGIN SOLUTION gpt_logits
        # TODO: run x through every block in self.transformer.h (block(x, cache)), then self.transformer.ln_f,
        # TODO: then self.lm_head -> logits (B, T, vocab_size).
        for block in self.transformer.h:
            x = block(x, cache)
        logits = self.lm_head(self.transformer.ln_f(x))
        # END SOLUTION
        if cache is not None:
            cache.length += T  # every layer has stored idx's keys and values
        if targets is None:
            return logits, None
        # BEGIN SOLUTION gpt_loss
        # TODO: mean cross-entropy between logits and targets: flatten logits to (B*T, vocab_size) and
        # TODO: targets to (B*T,), F.cross_entropy(..., ignore_index=-1), computed in fp32 (.float()). -> scalar
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        # END SOLUTION
        return logits, loss

    @classmethod
    def from_pretrained(cls, name_or_dir, dropout=0.0):
        """OpenAI's GPT-2: a name in pretrained.GPT2_NAMES or a folder in Hugging Face layout."""
        from pretrained import load_gpt2  # imported here: pretrained.py builds on this module
        return load_gpt2(cls, name_or_dir, dropout)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                 kv_cache=True):
        """idx (B, T) and max_new_tokens sampled tokens -> (B, T + max_new_tokens); temperature 0 is greedy, top_k
        and top_p keep the most likely tokens, a seeded generator makes it reproducible (see stream)."""
        tokens = self.stream(idx, max_new_tokens, temperature, top_k, top_p, generator, kv_cache)
        return torch.cat([idx, *tokens], dim=1)

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
               kv_cache=True):
        """Yield the sampled tokens (B, 1) one step at a time; the model sees the last block_size tokens at most.
        With kv_cache, the prompt is processed once, then only the newest token; past block_size, each step
        recomputes the window (cached keys of deeper layers depend on tokens that have left it)."""
        block_size, weight = self.config.block_size, self.lm_head.weight
        cache = KVCache(self.config, idx.size(0), weight.device, weight.dtype) if kv_cache else None
        new = idx[:, -block_size:]  # what the next forward has to process
        for _ in range(max_new_tokens):
            if cache is not None and cache.length + new.size(1) > block_size:  # window full: start again
                cache.length, new = 0, idx[:, -block_size:]  # from the last block_size tokens
            logits, _ = self(new, cache=cache)
            next_token = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat((idx, next_token), dim=1)
            new = next_token if kv_cache else idx[:, -block_size:]
            yield next_token


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits: (B, V) for the next position -> sampled token ids (B, 1)."""
    if temperature == 0:
        # BEGIN SOLUTION sample_greedy
        # TODO: greedy decoding: the index of the largest logit of each row, keeping the dim. -> (B, 1)
        return logits.argmax(dim=-1, keepdim=True)
        # END SOLUTION
    # BEGIN SOLUTION sample_temperature
    # TODO: divide the logits (in fp32: logits.float()) by temperature: < 1 sharpens, > 1 flattens. (B, V)
    logits = logits.float() / temperature
    # END SOLUTION
    if top_k is not None:
        # BEGIN SOLUTION sample_top_k
        # TODO: keep the top_k largest logits of each row (and any tied with the k-th largest): find the
        # TODO: k-th largest value with torch.topk(logits, k).values[:, [-1]] (k = min(top_k, V)) and set
        # TODO: every logit below it to float("-inf"). Shape stays (B, V).
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
        # END SOLUTION
    if top_p is not None:
        # BEGIN SOLUTION sample_top_p
        # TODO: nucleus sampling: sort the probabilities F.softmax(logits, -1) in descending order; a token
        # TODO: stays if the probability mass ranked strictly above it (cumsum minus itself) is < top_p,
        # TODO: so the token that crosses top_p stays and so does the most likely one. Set the logits of
        # TODO: the others to float("-inf") (scatter the sorted mask back to vocabulary order). (B, V)
        sorted_probs, sorted_idx = F.softmax(logits, dim=-1).sort(dim=-1, descending=True)  # (B, V)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
        remove = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, sorted_idx, mass_above >= top_p)
        logits = logits.masked_fill(remove, float("-inf"))
        # END SOLUTION
    # BEGIN SOLUTION sample_draw
    # TODO: turn logits into probabilities (F.softmax over the last dim) and draw one token per row with
    # TODO: torch.multinomial(probs, num_samples=1, generator=generator). -> (B, 1)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
    # END SOLUTION
