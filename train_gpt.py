"""
train_gpt.py -- the GPT model every stage shares, and pretraining ("the base model").

The lecture calls a language model a "giant mathematical expression": token ids go in, and out comes one
probability for every entry of the vocabulary -- a guess at the next token. Pretraining shows the model
windows of real text and, at every position at once, nudges its parameters so that the token which really
came next gets a little more probability. Do that for billions of tokens and the expression becomes a
lossy "zip file" of its training text: a *base model* that continues documents.

This file, top to bottom:
  1. the model (~300 lines): config, attention with a KV cache, MLP, block, GPT, sampling;
  2. the optimizer: Muon for the hidden matrices, AdamW for the rest, and the learning-rate schedule;
  3. machinery the later stages reuse: CLI from a dataclass, device/DDP setup, evaluation in bits per
     byte, atomic checkpoints;
  4. the pretraining main, plus `eval` (bits per byte of any text file) and `demo` (the "nudge").

    python train_gpt.py                                  # embedded corpus, tiny preset, CPU, a few minutes
    python train_gpt.py --input shakespeare.txt          # any text files (the last 10% of each held out)
    python train_gpt.py --preset d12 --shards fineweb    # GPT-2-small class, one GPU, on `data.py tokenize` shards
    torchrun --standalone --nproc_per_node=8 train_gpt.py --preset d20 --shards fineweb
    python train_gpt.py eval --checkpoint out/base --text some.txt
    python train_gpt.py demo                             # next-token probabilities before/after one step
"""
import argparse
import contextlib
import dataclasses
import glob
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
from tokenizer import Tokenizer

# ====================================================================================================
# 1. The model
# ====================================================================================================


@dataclass
class GPTConfig:
    """The shape of the network. These numbers (plus the trained weights) are the whole model."""
    vocab_size: int = 4096  # how many different tokens exist (set from the tokenizer)
    seq_len: int = 256  # the context window: the most tokens the model can look at at once
    n_layer: int = 4  # how many transformer blocks are stacked
    n_embd: int = 128  # width: the length of the vector that represents each token
    n_head: int = 4  # attention heads (queries) per block; head size = n_embd / n_head
    n_kv_head: int = 4  # key/value heads; fewer than n_head = grouped-query attention (smaller KV cache)
    softcap: float = 15.0  # logits are squashed smoothly into (-softcap, softcap)
    rope_base: float = 10000.0  # the slowest rotation of the rotary position embedding


def rms_norm(x):
    """Rescale each vector to unit root-mean-square. Keeps activations at a steady size through the depth
    of the network, so no layer's output can blow up or vanish. (No learnable gain: it is not needed
    when the next layer is a matrix that can learn any scale itself.)"""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len, head_dim, base):
    """Rotary position embedding (RoPE): position p rotates each pair of channels of a query/key by the
    angle p * frequency. The dot product of a rotated query and a rotated key then depends only on how far
    apart they are -- attention sees *relative* positions, and no position vectors have to be learned."""
    freqs = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # fast ... slow
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)  # (seq_len, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate x (B, T, heads, head_dim): channel i and channel i + head_dim/2 form one 2-D pair."""
    x1, x2 = x.chunk(2, dim=-1)
    if cos.dim() == 2:  # one table (T, head_dim/2) for every row, or one per row (B, T, head_dim/2)
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).type_as(x)


class KVCache:
    """Memory for incremental decoding. When generating, token t+1 needs the keys and values of all the
    tokens before it; recomputing them every step would cost O(T^2). The cache keeps each layer's keys and
    values, so each new token costs one small forward pass."""

    def __init__(self, config, batch_size, device, dtype=torch.float32, pad=None):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_kv_head, config.seq_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # how many tokens are stored; also the position of the next token
        # Prompts of different lengths in one batch are left-padded: row b starts with pad[b] filler
        # tokens that nothing attends to and that take no position, so each row computes exactly what it
        # would alone. None = no padding.
        self.pad = None if pad is None else torch.as_tensor(pad, dtype=torch.long, device=device)

    def repeat_rows(self, n):
        """Each row n times over (row b becomes rows b*n .. b*n+n-1): prefill a prompt once, then sample
        n different continuations of it."""
        self.keys = self.keys.repeat_interleave(n, dim=1)
        self.values = self.values.repeat_interleave(n, dim=1)
        if self.pad is not None:
            self.pad = self.pad.repeat_interleave(n)

    def store(self, layer, k, v):
        """Append this step's keys/values (B, kv_heads, T, head_dim) for one layer; return everything
        stored so far for that layer. GPT.forward advances `pos` once all layers have stored."""
        end = self.pos + k.size(2)
        self.keys[layer, :, :, self.pos:end] = k
        self.values[layer, :, :, self.pos:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    """Tokens talk to each other. Each token emits a query ("what am I looking for?"), a key ("what do I
    contain?") and a value ("what do I pass on?"); each query takes a weighted average of the values of the
    tokens whose keys match it. "Causal": a token may only look at itself and the past, never the future,
    because the future is what it must predict."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim)
        k = self.k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v(x).view(B, T, self.n_kv_head, self.head_dim)
        # QK-norm: normalising queries and keys bounds their dot products, so attention logits cannot grow
        # without limit and saturate the softmax (a common cause of training instability).
        q, k = apply_rotary(rms_norm(q), cos, sin), apply_rotary(rms_norm(k), cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if kv_cache is not None:
            k, v = kv_cache.store(self.layer_idx, k, v)
        gqa = self.n_kv_head != self.n_head  # several query heads share one key/value head
        pad = kv_cache.pad if kv_cache is not None else None
        if k.size(2) == T and pad is None:  # no earlier tokens: the plain causal (lower-triangular) mask
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # T new tokens after `past` cached ones: new token i sees keys 0 .. past + i
            past = k.size(2) - T
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=past)
            if pad is not None:  # filler keys are invisible; a filler query sees itself (no empty softmax)
                slots = torch.arange(k.size(2), device=x.device)
                own = slots[None, :] == (past + torch.arange(T, device=x.device))[:, None]
                mask = (mask & (slots >= pad[:, None, None])) | own  # (B, T, keys)
                mask = mask[:, None]  # the same for every head
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """Each token thinks on its own: widen 4x, apply a non-linearity, project back. ReLU^2 (relu, squared)
    is cheap and trains a little better than GELU in small models."""

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    """One transformer block: attention (communicate), then MLP (compute). Each adds its result to the
    "residual stream" x instead of replacing it, so the signal and its gradient pass straight through
    deep stacks. Pre-norm: each branch reads a normalised copy of the stream."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache):
        x = x + self.attn(rms_norm(x), cos, sin, kv_cache)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    """The whole expression: token ids (B, T) -> logits (B, T, vocab_size), one score per possible next
    token at every position. softmax(logits) is the model's probability distribution over the next token."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token id -> vector (a lookup table)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # vector -> logits; untied
        cos, sin = rotary_tables(config.seq_len, config.n_embd // config.n_head, config.rope_base)
        self.register_buffer("cos", cos, persistent=False)  # derived from the config, so not saved
        self.register_buffer("sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Random start: the model knows nothing, so its first predictions are noise. The layers that write
        into the residual stream start at exactly zero, so at step 0 every block is the identity and the
        network is shallow; training grows each block's contribution from nothing."""
        n = self.config.n_embd
        nn.init.normal_(self.wte.weight, std=1.0)
        for block in self.blocks:
            for lin in (block.attn.q, block.attn.k, block.attn.v, block.mlp.fc):
                nn.init.uniform_(lin.weight, -(3 / n) ** 0.5, (3 / n) ** 0.5)  # std 1/sqrt(fan_in)
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.mlp.proj.weight)
        nn.init.normal_(self.lm_head.weight, std=0.001)  # near-uniform first guesses: loss starts ~ln(vocab)

    def forward(self, idx, targets=None, kv_cache=None):
        """idx: (B, T) token ids. targets: (B, T) next-token ids, -1 where no loss should be taken.
        kv_cache: when given, idx continues the tokens already in the cache (incremental decoding).
        Returns (logits (B, T, vocab) in float32, mean cross-entropy loss or None)."""
        x = self.hidden_states(idx, kv_cache)
        # Soft-cap: logits = softcap * tanh(head(x) / softcap) squashes them into (-softcap, softcap)
        # smoothly; the model cannot become infinitely sure of anything, which keeps the loss and its
        # gradients tame. (The head is linear, so dividing its n_embd-wide input instead of its vocab-wide
        # output gives the same numbers with far less memory traffic: ~5% faster steps on a CPU.)
        c = self.config.softcap
        logits = c * torch.tanh(self.lm_head(x / c).float())
        if targets is None:
            return logits, None
        # Cross-entropy = -log(probability given to the true next token), averaged over positions.
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def hidden_states(self, idx, kv_cache=None):
        """The network without its output head: (B, T) ids -> (B, T, n_embd) normalised vectors, one per
        position, each summing up everything up to it. The head turns them into next-token scores; the
        reward model of rlhf.py puts a different head on the same vectors."""
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.seq_len:
            raise ValueError(f"{start + T} tokens exceed the context window of {self.config.seq_len}")
        if kv_cache is not None and kv_cache.pad is not None:  # row b's cache slot s is position s - pad[b]
            positions = (torch.arange(start, start + T, device=idx.device)[None] - kv_cache.pad[:, None]).clamp(min=0)
            cos, sin = self.cos[positions], self.sin[positions]
        else:
            cos, sin = self.cos[start:start + T], self.sin[start:start + T]
        x = rms_norm(self.wte(idx))
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        return rms_norm(x)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self):
        """Training FLOPs per token: every weight in a matrix multiply costs 2 FLOPs per token forward and
        4 backward (6 in all); the embedding is a lookup, not a multiply. Attention adds 6 x 2 x seq_len
        FLOPs per layer per query channel for its scores and weighted sums."""
        matmul_params = self.num_params() - self.wte.weight.numel()
        c = self.config
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.seq_len

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
                 stop_tokens=()):
        """The autoregressive loop: prefix -> distribution -> sample one token (a biased coin) -> append ->
        repeat. Yields each new token id as it is produced; stops after max_new_tokens or after yielding a
        stop token. temperature 0 = greedy (always the most likely token). A seed makes it reproducible."""
        device = self.wte.weight.device
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
        tokens = list(prompt)[-self.config.seq_len:]  # the window: the model only sees the last seq_len
        if not tokens:
            raise ValueError("generate() needs a prompt of at least one token (e.g. <|endoftext|>)")
        cache = KVCache(self.config, 1, device, self.wte.weight.dtype)
        pending = tokens  # tokens the cache has not seen yet
        for _ in range(max_new_tokens):
            if cache.pos + len(pending) > self.config.seq_len:
                # The window is full: keep its second half and rebuild the cache from it. (Positions
                # restart at 0, exactly as in training, where every window starts at position 0.)
                tokens = tokens[-self.config.seq_len // 2:]
                cache, pending = KVCache(self.config, 1, device, self.wte.weight.dtype), tokens
            logits, _ = self(torch.tensor([pending], device=device), kv_cache=cache)
            next_id = sample_next(logits[:, -1], temperature, top_k, top_p, generator).item()
            yield next_id
            if next_id in stop_tokens:
                return
            tokens = tokens + [next_id]
            pending = [next_id]


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick next tokens from logits (B, vocab) -> ids (B, 1). Temperature < 1 sharpens the distribution
    and > 1 flattens it; top-k keeps only the k likeliest tokens; top-p keeps the smallest set of likeliest
    tokens whose probabilities add up to p. Both cut off the long tail of unlikely (often nonsense) tokens."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already >= p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


# ====================================================================================================
# 2. The optimizer: Muon for hidden matrices, AdamW for the rest, and the learning-rate schedule
# ====================================================================================================


def orthogonalize(g, steps=5):
    """Newton-Schulz iteration: push every singular value of g towards 1 while keeping its singular vectors
    (approximately U V^T of g = U S V^T). The update then moves the weights by the same amount in every
    direction the gradient points to, instead of mostly along its few dominant directions. The quintic
    coefficients are the ones published with Muon: they make the iteration converge fast from any start."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16() if g.is_cuda else g.float()  # bf16 is accurate enough here and fast on GPUs
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.mT  # iterate on the wide orientation: x @ x^T is then the smaller matrix
    x = x / (x.norm() + 1e-7)  # singular values now <= 1, inside the iteration's basin
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-schulz, for 2-D weight matrices: SGD with Nesterov momentum
    whose update is orthogonalized before it is applied."""

    def __init__(self, params, lr=0.02, momentum=0.95, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = orthogonalize(p.grad + group["momentum"] * buf, group["ns_steps"])  # Nesterov
                # An orthogonal matrix has entries of size ~1/sqrt(columns); rescale tall matrices so every
                # shape moves its outputs by about the same amount per step.
                p.add_(update, alpha=-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)


def build_optimizers(model, cfg, device_type):
    """Muon for the matrices inside the blocks; AdamW for the embedding table and the output head, whose
    rows belong to individual tokens and see very uneven gradients (Muon's whole-matrix view suits them
    badly). Each group remembers its base learning rate, which the schedule scales every step."""
    matrices = [p for p in model.blocks.parameters()]
    adam_groups = [dict(params=[model.wte.weight], lr=cfg.embed_lr),
                   dict(params=[model.lm_head.weight], lr=cfg.head_lr)]
    adamw = torch.optim.AdamW(adam_groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=1e-10, weight_decay=0.0,
                              fused=device_type == "cuda")
    muon = Muon(matrices, lr=cfg.matrix_lr, momentum=cfg.muon_momentum)
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def lr_multiplier(step, num_steps, warmup_steps, warmdown_frac, final_frac):
    """The schedule: a short linear warmup (early gradients are large and noisy), a long constant stretch,
    then a linear warmdown to final_frac of the peak (small final steps settle into a low point)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    warmdown_start = num_steps * (1 - warmdown_frac)
    if step < warmdown_start:
        return 1.0
    progress = (step - warmdown_start) / max(1.0, num_steps - warmdown_start)
    return 1.0 - progress * (1.0 - final_frac)


# ====================================================================================================
# 3. Machinery shared by the later stages
# ====================================================================================================


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, mismatched checkpoint). run_cli prints its
    message as one line and exits with code 2, instead of a traceback."""


def require_positive(cfg, names):
    """Counts that must be at least 1 (steps, batch sizes, samples...): name the first flag that is not."""
    for name in names:
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")


def run_cli(main_fn, argv=None):
    """Run a stage's main; turn UserError into one clear line on stderr and exit code 2."""
    try:
        main_fn(sys.argv[1:] if argv is None else argv)
    except (UserError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def opt(default, help, low=None, high=None, above=None, choices=None, path=None):
    """A config field with its --help text, so the CLI documents itself, and what a valid value is, so
    parse_config can refuse a mistake before anything runs: `low`/`high` (inclusive bounds), `above`
    (an exclusive lower bound), `choices`, and for paths `path="dir"` (a folder that must exist, when
    given) or `path="out"` (a folder to write into: anything but an existing file)."""
    rules = {"low": low, "high": high, "above": above, "choices": choices, "path": path}
    return field(default=default, metadata={"help": help, **{k: v for k, v in rules.items() if v is not None}})


def check_flags(cfg):
    """Every field of a parsed config against the rules of its opt(): the first broken one is one line
    naming the flag and what it expects. Floats must be finite whatever the rules (a NaN learning rate
    would train a model of NaNs without a word)."""
    for f in fields(cfg):
        value, rule, flag = getattr(cfg, f.name), f.metadata, "--" + f.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, got {value}")
        if "choices" in rule and value not in rule["choices"]:
            raise UserError(f"{flag} must be one of {', '.join(map(str, rule['choices']))}, got {value!r}")
        if "low" in rule and value < rule["low"]:
            raise UserError(f"{flag} must be at least {rule['low']}, got {value}")
        if "high" in rule and value > rule["high"]:
            raise UserError(f"{flag} must be at most {rule['high']}, got {value}")
        if "above" in rule and not value > rule["above"]:
            raise UserError(f"{flag} must be greater than {rule['above']}, got {value}")
        if rule.get("path") == "dir" and value and not os.path.isdir(value):
            raise UserError(f"{flag} {value}: no such folder")
        if rule.get("path") == "out" and os.path.exists(value) and not os.path.isdir(value):
            raise UserError(f"{flag} {value}: is a file; expected a folder to write into")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage block too; one line is clearer
        raise UserError(f"{self.prog}: {message} (see --help)")


def parse_config(cls, argv, presets=None, prog=None, description=None, aliases=None):
    """Build the CLI from a config dataclass: one --flag per field (bools get --flag/--no-flag), plus
    --preset NAME when presets are given, plus short `aliases` ({"prompt": "-p"}). Precedence: dataclass
    defaults < preset < explicit flags. The result is checked against each field's rules (see opt)."""
    parser = _Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if presets:
        parser.add_argument("--preset", help=f"named configuration: {', '.join(presets)}")
    for f in fields(cls):
        flags = ["--" + f.name.replace("_", "-")] + ([aliases[f.name]] if aliases and f.name in aliases else [])
        help = f"{f.metadata.get('help', '')} (default: {f.default})"
        if isinstance(f.default, bool):
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        elif isinstance(f.default, tuple):
            parser.add_argument(*flags, nargs="*", default=argparse.SUPPRESS, metavar="X", help=help)
        else:
            kind = str if f.default is None else type(f.default)
            parser.add_argument(*flags, type=kind, default=argparse.SUPPRESS, metavar=kind.__name__.upper(),
                                help=help)
    args = vars(parser.parse_args(argv))
    preset = args.pop("preset", None)
    if preset is not None and preset not in presets:
        raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(presets)}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    cfg = cls(**{**(presets[preset] if preset else {}), **overrides})
    check_flags(cfg)
    return cfg


@dataclass
class Runtime:
    """Where and how this process computes: device, autocast dtype, and its place in a distributed job."""
    device: torch.device
    autocast_dtype: torch.dtype  # None = plain float32
    rank: int = 0  # this process's index among `world` processes (torchrun sets RANK / WORLD_SIZE)
    world: int = 1

    @property
    def master(self):
        return self.rank == 0  # only one process prints and writes files

    def autocast(self):
        """Matrix multiplies in bfloat16 (2-16x faster on GPUs, half the memory traffic) while the weights
        and the optimizer stay float32; off when autocast_dtype is None."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def setup_runtime(device="auto", dtype="auto"):
    """cuda > mps > cpu; bf16 autocast on CUDA, float32 elsewhere (both overridable). When launched by
    torchrun, join the process group: nccl between GPUs, gloo between CPU processes."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device must be cuda, mps, cpu or auto (or cuda:N), got {device!r}") from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(device.type)
    if available is not None and not available():
        raise UserError(f"--device {device}: no {device.type} device is available on this machine (try --device cpu)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls that remain use tensor cores too
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    choices = {"auto": torch.bfloat16 if device.type == "cuda" else None, "float32": None, "bfloat16": torch.bfloat16}
    if dtype not in choices:
        raise UserError(f"--dtype must be one of {', '.join(choices)}, got {dtype!r}")
    return Runtime(device, choices[dtype], rank, world)


def all_reduce_mean(tensors, rt):
    """Distributed data parallelism in one step: every process computed gradients on its own slice of the
    batch; average them so all processes apply the same update and their weights stay identical."""
    if rt.world == 1:
        return
    handles = [dist.all_reduce(t, async_op=True) for t in tensors]  # gloo has no AVG: sum, then divide
    for h in handles:
        h.wait()
    for t in tensors:
        t.div_(rt.world)


def token_byte_counts(tokenizer):
    """How many UTF-8 bytes of text each token id stands for (special tokens: 0, they are not text).
    Bits per byte divides by these, so it does not depend on how the tokenizer chops the text up."""
    specials = set(tokenizer.special_tokens.values())
    counts = [0 if i in specials else len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size)]
    return torch.tensor(counts, dtype=torch.float64)


@torch.no_grad()
def evaluate(model, batches, token_bytes, rt):
    """Mean loss (nats per token) and bits per byte over batches of (x, y). Bits per byte = total
    -log2 p(true token) / total bytes of text predicted: how many bits the model needs to encode each byte
    of the text -- comparable across tokenizers and with compressors (and with character-level models)."""
    model.eval()
    nats, count, nbytes = torch.zeros(3, dtype=torch.float64, device=rt.device).unbind(0)
    token_bytes = token_bytes.to(rt.device)
    for x, y in batches:
        x, y = x.to(rt.device), y.to(rt.device)
        with rt.autocast():
            logits, _ = model(x)
        y = y.reshape(-1)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y, ignore_index=-1, reduction="none").double()
        nb = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0.0)  # target -1 = padding: no bytes
        is_text = nb > 0  # special tokens such as <|endoftext|> carry no text: they are not scored
        nats, count, nbytes = nats + loss[is_text].sum(), count + is_text.sum(), nbytes + nb.sum()
    totals = torch.stack([nats, count, nbytes])
    if rt.world > 1:
        dist.all_reduce(totals)
    model.train()
    nats, count, nbytes = totals.tolist()
    return dict(loss=nats / max(count, 1), bpb=nats / math.log(2) / max(nbytes, 1))


def _atomic_torch_save(obj, path):
    """Write to a temp file in the same folder, then rename: a crash mid-write (or a kill) leaves the
    previous file intact, never half a checkpoint."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_checkpoint(path, model, tokenizer, step, config, metrics=None, optimizers=(), loader_states=None,
                    stage="base", extra=None):
    """One .pt file with everything needed to use the model (weights, model config, the tokenizer itself)
    and to resume training exactly (step, optimizer states, every rank's loader position, RNG states).
    `extra`: more named state (e.g. the reward model's head), handed back in load_checkpoint's meta."""
    state = dict(
        stage=stage, step=step, model=model.state_dict(), model_config=dataclasses.asdict(model.config),
        tokenizer=tokenizer.to_json(), tokenizer_hash=tokenizer.hash(),
        config=dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config),
        metrics=metrics or {}, optimizers=[o.state_dict() for o in optimizers], loaders=loader_states,
        rng=dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []),
        **(extra or {}),
    )
    _atomic_torch_save(state, path)


def checkpoint_file(path):
    """Accept a checkpoint file or a stage folder (out/base -> out/base/model.pt)."""
    return os.path.join(path, "model.pt") if os.path.isdir(path) else path


def load_checkpoint(path, device="cpu", tokenizer=None):
    """-> (model, tokenizer, meta). meta holds everything else that was saved (step, configs, metrics,
    optimizer/loader/RNG states). Pass `tokenizer` to insist on a particular one: it must be the one the
    model was trained with."""
    path = checkpoint_file(path)
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path} (train one first, e.g. `python train_gpt.py`)")
    try:
        meta = torch.load(path, map_location=device, weights_only=True)
        model_state, model_config = meta.pop("model"), GPTConfig(**meta["model_config"])
        saved = meta["tokenizer"]
    except Exception as e:  # a truncated file, another program's .pt, an older layout
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"{path} is not a readable scratchgpt checkpoint ({type(e).__name__}: {first_line})") from None
    if tokenizer is None:
        tokenizer = Tokenizer.from_json(saved, source=f"the tokenizer inside {path}")
    elif tokenizer.hash() != meta["tokenizer_hash"]:
        raise UserError(f"{path} was trained with tokenizer {meta['tokenizer_hash']} but the given tokenizer is "
                        f"{tokenizer.hash()} (vocab {tokenizer.vocab_size} vs model's {model_config.vocab_size})")
    if tokenizer.vocab_size != model_config.vocab_size:
        raise UserError(f"{path}: tokenizer vocab {tokenizer.vocab_size} differs from the model's "
                        f"{model_config.vocab_size}")
    model = GPT(model_config).to(device)
    model.load_state_dict(model_state)
    return model, tokenizer, meta


# ====================================================================================================
# 4. Pretraining
# ====================================================================================================


@dataclass
class TrainConfig:
    """Every knob of a pretraining run. The defaults are the `tiny` preset: a few minutes on 2 CPU cores."""
    # the network
    depth: int = opt(4, "transformer blocks (n_layer)", low=1)
    n_embd: int = opt(128, "width of the residual stream", low=1)
    n_head: int = opt(4, "query heads per block", low=1)
    n_kv_head: int = opt(4, "key/value heads (fewer than n_head = grouped-query attention)", low=1)
    seq_len: int = opt(256, "context window in tokens", low=1)
    # the data
    shards: str = opt("", "train on the shard set NAME made by `python data.py tokenize --name NAME` (e.g. FineWeb)")
    input: tuple = opt((), "train on these text files instead of the embedded corpus")
    val_input: tuple = opt((), "held-out text files for --input (default: the last 10%% of each --input file)")
    tokenizer: str = opt("", "tokenizer.json to use (default: the one data.py prepares)")
    out_dir: str = opt(os.path.join("out", "base"), "where the checkpoint, logs and metrics go", path="out")
    # the batch: batch_size windows of seq_len tokens per process per micro-step; micro-steps are
    # accumulated until total_batch_tokens tokens have been seen, then the optimizer steps once
    batch_size: int = opt(32, "windows per process per micro-step", low=1)
    total_batch_tokens: int = opt(8192, "tokens per optimizer step, over all processes and micro-steps", low=1)
    num_steps: int = opt(220, "optimizer steps", low=1)
    # the optimizer
    matrix_lr: float = opt(0.04, "Muon learning rate for the matrices inside the blocks", low=0)
    embed_lr: float = opt(0.3, "AdamW learning rate for the token embedding", low=0)
    head_lr: float = opt(0.008, "AdamW learning rate for the output head", low=0)
    muon_momentum: float = opt(0.95, "Muon momentum", low=0, high=1)
    adam_beta1: float = opt(0.8, "AdamW beta1", low=0, high=1)
    adam_beta2: float = opt(0.95, "AdamW beta2", low=0, high=1)
    warmup_steps: int = opt(10, "linear learning-rate warmup", low=0)
    warmdown_frac: float = opt(0.4, "fraction of steps at the end with a linearly decaying learning rate",
                               low=0, high=1)
    final_lr_frac: float = opt(0.0, "learning rate at the last step, as a fraction of the peak", low=0, high=1)
    grad_clip: float = opt(0.0, "clip the gradient norm to this (0 = no clipping)", low=0)
    # watching it learn
    eval_every: int = opt(100, "steps between validation evaluations (0 = only at the end)", low=0)
    eval_tokens: int = opt(32768, "validation tokens per intermediate evaluation (the final one reads all)", low=1)
    sample_every: int = opt(50, "steps between generated samples (0 = never)", low=0)
    sample_tokens: int = opt(64, "tokens per generated sample", low=1)
    save_every: int = opt(50, "steps between checkpoints, so a killed run can --resume (0 = only at the end)", low=0)
    # where and how
    device: str = opt("auto", "cuda, mps, cpu, or auto")
    dtype: str = opt("auto", "autocast dtype: auto (bfloat16 on CUDA), float32, bfloat16",
                      choices=("auto", "float32", "bfloat16"))
    compile: str = opt("auto", "torch.compile: auto (on CUDA only), on, off", choices=("auto", "on", "off"))
    seed: int = opt(1337, "random seed; the same seed gives the same run on CPU")
    resume: bool = opt(False, "continue from the checkpoint in out_dir")


# Width follows depth on GPUs (n_embd = 64 x depth, 128-wide heads). The batch is ~0.5M tokens per step;
# num_steps gives about 20 training tokens per parameter (the "Chinchilla" ratio) for a 64K vocabulary.
def _gpu_preset(depth, num_steps, batch_size):
    return dict(depth=depth, n_embd=64 * depth, n_head=depth // 2, n_kv_head=depth // 2, seq_len=2048,
                batch_size=batch_size, total_batch_tokens=524288, num_steps=num_steps, matrix_lr=0.02,
                embed_lr=0.2 * (64 * depth / 768) ** -0.5, head_lr=0.004 * (64 * depth / 768) ** -0.5,
                warmup_steps=0, warmdown_frac=0.2, eval_every=250, eval_tokens=10 * 524288, sample_every=1000,
                save_every=1000)


PRESETS = {
    "tiny": {},
    "d12": _gpu_preset(12, 5000, 32),
    "d20": _gpu_preset(20, 21000, 16),
    "d26": _gpu_preset(26, 33000, 8),
}

# The lecture's reference run, printed beside ours
GPT2_FACTS = ("GPT-2 (2019): 1.6B parameters, 1024-token context, ~100B training tokens; reproduced by llm.c "
              "in about a day for about $600 on 8xH100 (vs ~$40k in 2019)")


def prepare_data(cfg):
    """-> {"tokenizer", "train", "val"}: a tokenizer path and two shard patterns. data.py does the work:
    the embedded corpus by default (tokenizer trained and shards written on first use), or any text files
    given by --input, tokenized afresh with the default (or --tokenizer) tokenizer, or a shard set that
    `python data.py tokenize --name NAME` made (--shards NAME)."""
    if cfg.shards:
        return {"tokenizer": cfg.tokenizer or data.TOKENIZER_PATH,
                **{s: data.shard_pattern(cfg.shards, s) for s in ("train", "val")}}
    if not cfg.input:
        paths = data.prepare_default()
        return {**paths, "tokenizer": cfg.tokenizer or paths["tokenizer"]}
    tokenizer_path = cfg.tokenizer or data.prepare_tokenizer()
    train_docs = [d["text"] for d in data.read_documents(data.expand_inputs(cfg.input)) if "text" in d]
    if cfg.val_input:
        val_docs = [d["text"] for d in data.read_documents(data.expand_inputs(cfg.val_input)) if "text" in d]
    else:  # hold out the last 10% of every document (nanoGPT's split of its Shakespeare file)
        cuts = [int(len(t) * 0.9) for t in train_docs]
        val_docs = [t[c:] for t, c in zip(train_docs, cuts)]
        train_docs = [t[:c] for t, c in zip(train_docs, cuts)]
    shards_dir = os.path.join(cfg.out_dir, "shards")
    data.tokenize_to_shards({"train": train_docs, "val": val_docs}, "input", tokenizer_path, shards_dir)
    return {"tokenizer": tokenizer_path, **{s: data.shard_pattern("input", s, shards_dir) for s in ("train", "val")}}


def open_data(cfg, rt):
    """The master process prepares the data (once), the others wait and get the paths from it.
    -> (tokenizer, train shard pattern, val shard pattern)."""
    paths = [prepare_data(cfg) if rt.master else None]
    if rt.world > 1:
        dist.broadcast_object_list(paths, src=0)
    paths = paths[0]
    if not os.path.exists(paths["tokenizer"]):
        raise UserError(f"no tokenizer at {paths['tokenizer']}")
    try:
        tokenizer = Tokenizer.load(paths["tokenizer"])
    except ValueError as e:
        raise UserError(str(e)) from None
    return tokenizer, paths["train"], paths["val"]


class RandomWindows:
    """Training batches: every row is a window of seq_len + 1 tokens starting at a random place in the token
    stream (data.py's loader supplies the stream). Random windows matter: consecutive windows come from the
    same work, and a batch of them is one long stretch of one play, which makes a step's gradient a poor
    estimate of the whole corpus's (measured: 2.33 vs 2.50 val bits/byte after 600K tokens of the tiny
    model). The positions of draw c are a pure function of (seed, c), and rank r takes rows r*B .. r*B+B-1
    of the world*B drawn, so N processes see exactly the rows one process with N times the batch sees, and
    resuming only needs c."""

    def __init__(self, pattern, B, T, rank, world, seed):
        self.stream = data.DataLoader(pattern, B, T, rank, world)  # checks there are enough tokens
        self.B, self.T, self.rank, self.world, self.seed = B, T, rank, world, seed
        self.draws = 0

    def next_batch(self):
        rng = np.random.default_rng([self.seed, self.draws])
        starts = rng.integers(0, self.stream.total - self.T, size=self.world * self.B)
        mine = starts[self.rank * self.B:(self.rank + 1) * self.B]
        rows = torch.from_numpy(np.stack([self.stream.tokens(int(s), self.T + 1) for s in mine]))
        self.draws += 1
        return rows[:, :-1], rows[:, 1:]  # inputs, and the same shifted by one: the next token everywhere

    def state_dict(self):
        return {"draws": self.draws}

    def load_state_dict(self, state):
        self.draws = state["draws"]


def val_batches(pattern, cfg, rt, max_tokens):
    """Batches of the validation split, always from its start, so every evaluation sees the same text.
    max_tokens < 0 means the whole split."""
    loader = data.DataLoader(pattern, cfg.batch_size, cfg.seq_len, rt.rank, rt.world)
    total = loader.total - 1 if max_tokens < 0 else min(max_tokens, loader.total - 1)
    for _ in range(max(1, total // loader.step_tokens)):
        yield loader.next_batch()


def ascii_curve(values, width=60, height=12):
    """A loss curve as text, so it shows in any terminal and any log file."""
    if not values:
        return ""
    n = min(width, len(values))
    cols = [values[i * len(values) // n] for i in range(n)]
    lo, hi = min(cols), max(cols)
    height = height if hi > lo else 0  # a flat series is one row, not a block of stars
    half_row = (hi - lo) / (2 * height) if height else 0.0
    rows = []
    for r in range(height, -1, -1):
        level = lo + (hi - lo) * r / height if height else lo
        marks = "".join("*" if abs(v - level) <= half_row + 1e-12 else " " for v in cols)
        rows.append(f"{level:7.3f} |{marks}")
    return "\n".join(rows + [" " * 8 + "+" + "-" * len(cols) + f"> step (0..{len(values) - 1})"])


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}  # dense bf16, per GPU


def peak_flops(device):
    """The GPU's advertised bf16 peak, for MFU (model FLOPs utilisation); None where unknown (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def fmt_time(seconds):
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def print_plan(cfg, model, accum, rt, train_tokens):
    n = model.num_params()
    tokens = cfg.total_batch_tokens * cfg.num_steps
    print(f"model: {cfg.depth} layers x {cfg.n_embd} wide, {cfg.n_head} heads ({cfg.n_kv_head} kv), context "
          f"{cfg.seq_len}, vocab {model.config.vocab_size:,} -> {n:,} parameters "
          f"({n - model.wte.weight.numel():,} outside the embedding)")
    print(f"plan: {cfg.num_steps:,} steps x {cfg.total_batch_tokens:,} tokens/step = {tokens:,} tokens "
          f"({tokens / n:.1f} per parameter, {tokens / train_tokens:.1f} passes over the {train_tokens:,}-token "
          f"training split); {rt.world} process(es) x {cfg.batch_size} x {cfg.seq_len} tokens "
          f"x {accum} accumulation step(s); device {rt.device}, "
          f"{'bf16 autocast' if rt.autocast_dtype else 'float32'}")
    print(f"for scale: {GPT2_FACTS}; its batch was ~1M tokens/step (ours {cfg.total_batch_tokens:,})")


def restore(path, model, optimizers, loader, cfg, rt):
    """Resume: load weights, optimizer and loader states and RNG from a checkpoint -> the step to continue
    from. Refuses a checkpoint whose model shape differs from the config."""
    loaded, _, meta = load_checkpoint(path, device=rt.device)
    if loaded.config != model.config:
        raise UserError(f"cannot resume from {checkpoint_file(path)}: it holds {loaded.config} but the config "
                        f"asks for {model.config}")
    if not meta["loaders"] or len(meta["loaders"]) != rt.world:
        raise UserError(f"cannot resume from {checkpoint_file(path)}: it was saved by "
                        f"{len(meta['loaders'] or [])} process(es), this run has {rt.world}")
    model.load_state_dict(loaded.state_dict())
    for opt_, state in zip(optimizers, meta["optimizers"]):
        opt_.load_state_dict(state)
    loader.load_state_dict(meta["loaders"][rt.rank])
    torch.set_rng_state(meta["rng"]["cpu"].cpu())
    if meta["rng"]["cuda"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in meta["rng"]["cuda"]])
    return meta["step"]


def gather_loader_states(loader, rt):
    """Every process reads its own slice of the data; a resumable checkpoint needs all their positions."""
    if rt.world == 1:
        return [loader.state_dict()]
    states = [None] * rt.world
    dist.all_gather_object(states, loader.state_dict())
    return states


def build_model(cfg, vocab_size):
    """A freshly initialised GPT of the shape cfg asks for."""
    if cfg.n_embd % cfg.n_head or cfg.n_head % cfg.n_kv_head or (cfg.n_embd // cfg.n_head) % 2:
        raise UserError(f"n_embd {cfg.n_embd} must split into n_head {cfg.n_head} heads of even size, and n_head "
                        f"into n_kv_head {cfg.n_kv_head} groups")
    return GPT(GPTConfig(vocab_size=vocab_size, seq_len=cfg.seq_len, n_layer=cfg.depth, n_embd=cfg.n_embd,
                         n_head=cfg.n_head, n_kv_head=cfg.n_kv_head))


def train_step(model, train_model, optimizers, loader, accum, lr_mult, cfg, rt):
    """One optimizer step on total_batch_tokens tokens -> (mean loss, gradient norm) before the update.
    The batch is processed in `accum` micro-batches per process (what fits in memory); their gradients add
    up, then all processes average theirs, so the step is the same as one on the whole batch at once.
    The update is skipped if the loss is not finite: the caller stops the run."""
    for opt_ in optimizers:
        for group in opt_.param_groups:
            group["lr"] = group["base_lr"] * lr_mult
    loss = torch.zeros((), device=rt.device)
    for _ in range(accum):
        x, y = loader.next_batch()
        with rt.autocast():
            _, micro_loss = train_model(x.to(rt.device), y.to(rt.device))
        (micro_loss / accum).backward()  # gradients add up over micro-steps: divide to get the mean
        loss += micro_loss.detach() / accum
    all_reduce_mean([p.grad for p in model.parameters()] + [loss], rt)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")).item()
    loss = loss.item()
    if math.isfinite(loss) and math.isfinite(grad_norm):
        for opt_ in optimizers:
            opt_.step()
    model.zero_grad(set_to_none=True)
    return loss, grad_norm


def write_results(cfg, metrics, losses):
    """metrics.json (the report card reads it) and the loss curve, as a file and on screen."""
    curve = save_curves(cfg.out_dir, "loss_curve", "pretraining", {"training loss": list(enumerate(losses))})
    write_metrics(cfg.out_dir, metrics)
    print(curve)
    print(f"final: val bpb {metrics['val_bpb']:.4f} (val loss {metrics['val_loss']:.4f}) after "
          f"{metrics['tokens']:,} tokens; {fmt_time(metrics['wall_seconds'])} wall -> {cfg.out_dir}")


# ----------------------------------------------------------------------------------------------------
# The report card: every stage's headline figures in one place (out/report.md, out/report.json)

REPORT_STAGES = {  # stage folder -> (what it is, the figures that show its effect)
    "tokenizer": ("text -> tokens", ["vocab_size", "bytes_per_token", "train_seconds"]),
    "base": ("pretraining: a document simulator", ["val_bpb", "params", "tokens", "train_seconds", "sample"]),
    "sft": ("finetuning on conversations: an assistant", ["format_rate", "identity_rate", "refusal_unknown_rate",
                                                         "answer_known_rate", "tool_accuracy",
                                                         "word_problem_accuracy", "train_seconds"]),
    "rl": ("practice problems: reinforce what is right", ["pass1_before", "pass1_after", "passk_before",
                                                         "passk_after", "k", "train_seconds"]),
    "rlhf": ("a reward model from rankings, and its limits", [
        "orderings", "rm_pair_accuracy", "true_reward_sft", "true_reward_final", "proxy_reward_sft",
        "proxy_reward_final", "stop_step", "stop_reason", "hack_peak_step", "hack_true_peak", "hack_true_final",
        "hack_proxy_peak", "hack_proxy_final", "rollout_tokens", "train_seconds", "hack_seconds"]),
}
CURVES = ".curves.json"  # a stage's curves: out/<stage>/<name>.curves.json (+ <name>.txt, + <name>.png)


def save_curves(out_dir, name, title, series):
    """Curves a person should see -> out_dir/name.txt (drawn as text: any terminal, any log) and
    out_dir/name.curves.json (the numbers: the report card draws them as a PNG when matplotlib is installed).
    series: {label: [(step, value), ...]}. Returns the text."""
    text = "\n\n".join(f"{title}, {label}:\n{ascii_curve([y for _, y in points])}" for label, points in series.items())
    os.makedirs(out_dir, exist_ok=True)
    for path, content in ((os.path.join(out_dir, name + ".txt"), text + "\n"),
                          (os.path.join(out_dir, name + CURVES), json.dumps(dict(title=title, series=series)))):
        with open(path + ".tmp", "w") as f:
            f.write(content)
        os.replace(path + ".tmp", path)
    return text


def draw_png(curves_path):
    """name.curves.json -> name.png, one panel per series, when matplotlib is installed -> the PNG's path or
    None. (matplotlib is optional: the text curves say the same.)"""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    with open(curves_path) as f:
        curves = json.load(f)
    fig, axes = plt.subplots(1, len(curves["series"]), figsize=(4.5 * len(curves["series"]), 3.2), squeeze=False)
    for ax, (label, points) in zip(axes[0], curves["series"].items()):
        ax.plot([x for x, _ in points], [y for _, y in points], marker="." if len(points) < 40 else None)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(curves["title"], fontsize=10)
    fig.tight_layout()
    png = curves_path[:-len(CURVES)] + ".png"
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png


def write_metrics(out_dir, metrics):
    """A stage's headline figures -> out_dir/metrics.json (atomically), then refresh the report card in
    the folder above, so the report always shows every stage that has finished."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "metrics.json")
    with open(path + ".tmp", "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(path + ".tmp", path)
    write_report(os.path.dirname(os.path.abspath(out_dir)))


def write_report(root):
    """Gather root/<stage>/metrics.json of every stage that has one into root/report.json and a
    readable root/report.md (with the curves the stages drew)."""
    stages = {}
    for stage in REPORT_STAGES:
        path = os.path.join(root, stage, "metrics.json")
        if os.path.exists(path):
            with open(path) as f:
                stages[stage] = json.load(f)
    import platform  # only here: nothing else needs it
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " + \
        (torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
    lines = ["# scratchgpt report card", "", f"Machine: {machine}", ""]
    for stage, figures in stages.items():
        title, keys = REPORT_STAGES[stage]
        lines += [f"## {stage}: {title}", "", "| figure | value |", "|---|---|"]
        lines += [f"| {key} | {format_figure(figures[key])} |" for key in keys if key in figures]
        for curves in sorted(glob.glob(os.path.join(root, stage, "*" + CURVES))):
            name = os.path.basename(curves)[:-len(CURVES)]
            png = draw_png(curves)
            if png:
                lines += ["", f"![{stage} {name}]({stage}/{os.path.basename(png)})"]
            with open(os.path.join(root, stage, name + ".txt")) as f:
                lines += ["", f"`{stage}/{name}.txt`:", "", "```", f.read().rstrip(), "```"]
        lines.append("")
    for name, text in (("report.json", json.dumps({"machine": machine, "stages": stages}, indent=1)),
                       ("report.md", "\n".join(lines))):
        with open(os.path.join(root, name + ".tmp"), "w") as f:
            f.write(text + "\n")
        os.replace(os.path.join(root, name + ".tmp"), os.path.join(root, name))


def format_figure(value):
    if isinstance(value, str):  # a sample of text: one table cell, its line breaks shown as ⏎
        return "`" + value.replace("`", "'").replace("\n", " ⏎ ") + "`"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    return str(value)


def report_main(argv):
    """`python train_gpt.py report [DIR]`: rebuild DIR/report.md (default out/) and print it."""
    root = argv[0] if argv else "out"
    if not os.path.isdir(root):
        raise UserError(f"no {root}/ folder: run a stage first (bash run.sh)")
    write_report(root)
    with open(os.path.join(root, "report.md")) as f:
        print(f.read())


def train(cfg):
    """Pretrain a GPT as cfg says -> the final metrics. Writes to cfg.out_dir: model.pt (checkpoint),
    log.jsonl (one row per step and per evaluation), loss_curve.txt and metrics.json."""
    started = time.time()
    rt = setup_runtime(cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    log = print if rt.master else (lambda *a, **k: None)
    tokenizer, train_pattern, val_pattern = open_data(cfg, rt)
    micro_tokens = cfg.batch_size * cfg.seq_len * rt.world
    if cfg.total_batch_tokens % micro_tokens:
        raise UserError(f"--total-batch-tokens {cfg.total_batch_tokens} is not a multiple of batch_size x seq_len "
                        f"x processes = {cfg.batch_size} x {cfg.seq_len} x {rt.world} = {micro_tokens}")
    accum = cfg.total_batch_tokens // micro_tokens
    model = build_model(cfg, tokenizer.vocab_size).to(rt.device)
    optimizers = build_optimizers(model, cfg, rt.device.type)
    loader = RandomWindows(train_pattern, cfg.batch_size, cfg.seq_len, rt.rank, rt.world, cfg.seed)
    ckpt_path = os.path.join(cfg.out_dir, "model.pt")
    step = restore(ckpt_path, model, optimizers, loader, cfg, rt) if cfg.resume else 0
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and rt.device.type == "cuda")
    train_model = torch.compile(model) if use_compile else model
    token_bytes = token_byte_counts(tokenizer)
    flops_per_step, peak = model.flops_per_token() * cfg.total_batch_tokens, peak_flops(rt.device)
    if rt.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        print_plan(cfg, model, accum, rt, loader.stream.total)
        if cfg.resume:
            print(f"resuming from {ckpt_path} at step {step}")
    log_file = open(os.path.join(cfg.out_dir, "log.jsonl"), "a" if cfg.resume else "w") if rt.master else None

    def record(row):
        if log_file:
            log_file.write(json.dumps({**row, "elapsed": time.time() - started}) + "\n")
            log_file.flush()

    def save(metrics=None):
        states = gather_loader_states(loader, rt)
        if rt.master:
            save_checkpoint(ckpt_path, model, tokenizer, step, cfg, metrics, optimizers, states)

    losses, timed_seconds, steps_timed, loop_started = [], 0.0, 0, time.time()
    bos = tokenizer.special_id("<|endoftext|>")
    while step < cfg.num_steps:
        if cfg.eval_every and step % cfg.eval_every == 0 and step > 0:
            res = evaluate(train_model, val_batches(val_pattern, cfg, rt, cfg.eval_tokens), token_bytes, rt)
            log(f"step {step}/{cfg.num_steps} | val loss {res['loss']:.4f} | val bpb {res['bpb']:.4f}")
            record(dict(step=step, val_loss=res["loss"], val_bpb=res["bpb"]))
        if cfg.sample_every and step % cfg.sample_every == 0 and step > 0 and rt.master:
            sample = model.generate([bos], cfg.sample_tokens, temperature=0.8, top_k=50, seed=cfg.seed)
            print(f"generating:\n{tokenizer.decode(list(sample))}\n" + "-" * 40)
        t0 = time.time()
        mult = lr_multiplier(step, cfg.num_steps, cfg.warmup_steps, cfg.warmdown_frac, cfg.final_lr_frac)
        loss_value, grad_norm = train_step(model, train_model, optimizers, loader, accum, mult, cfg, rt)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            raise UserError(f"loss {loss_value} / grad norm {grad_norm} at step {step}: training diverged "
                            f"(try a lower learning rate); the last good checkpoint, if any, is kept at {ckpt_path}")
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        step += 1
        losses.append(loss_value)
        if len(losses) > 1:  # the first step pays for compilation and cold caches: not a speed figure
            timed_seconds, steps_timed = timed_seconds + dt, steps_timed + 1
        tok_per_s = cfg.total_batch_tokens / dt
        mfu = f"{100 * flops_per_step / dt / (peak * rt.world):.1f}%" if peak else "-"
        eta = timed_seconds / max(steps_timed, 1) * (cfg.num_steps - step)
        log(f"step {step}/{cfg.num_steps} | loss {loss_value:.4f} | lr {mult:.3f}x | grad norm "
            f"{grad_norm:.3f} | {tok_per_s:,.0f} tok/s | mfu {mfu} | elapsed {fmt_time(time.time() - started)} "
            f"| eta {fmt_time(eta)}")
        record(dict(step=step, loss=loss_value, lr_mult=mult, grad_norm=grad_norm, dt=dt))
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.num_steps:
            save()

    train_seconds = time.time() - loop_started
    res = evaluate(train_model, val_batches(val_pattern, cfg, rt, -1), token_bytes, rt)
    metrics = dict(val_bpb=res["bpb"], val_loss=res["loss"], params=model.num_params(),
                   tokens=step * cfg.total_batch_tokens, train_seconds=train_seconds,
                   tokens_per_second=steps_timed * cfg.total_batch_tokens / max(timed_seconds, 1e-9),
                   mfu=flops_per_step * steps_timed / max(timed_seconds, 1e-9) / (peak * rt.world) if peak else None,
                   wall_seconds=time.time() - started)
    if rt.master:  # what the document simulator writes now, for the report card
        metrics["sample"] = tokenizer.decode(list(model.generate([bos], cfg.sample_tokens, temperature=0.8, top_k=50,
                                                                 seed=cfg.seed)))
    record(dict(step=step, val_loss=res["loss"], val_bpb=res["bpb"], final=True))
    save(metrics)
    if rt.master:
        log_file.close()
        write_results(cfg, metrics, losses)
    return metrics


# ----------------------------------------------------------------------------------------------------
# python train_gpt.py eval / demo


@dataclass
class EvalConfig:
    checkpoint: str = opt(os.path.join("out", "base"), "checkpoint file or stage folder")
    text: str = opt("", "UTF-8 text file to measure")
    batch_size: int = opt(8, "windows per forward pass", low=1)
    device: str = opt("auto", "cuda, mps, cpu, or auto")


def text_bpb(model, tokenizer, text, batch_size, rt):
    """Bits per byte of one text: cut its tokens into non-overlapping windows of the model's context and
    score every prediction inside them."""
    ids = tokenizer.encode(text)
    T = model.config.seq_len
    if len(ids) < 2:
        raise UserError("the text is too short to measure: it needs at least 2 tokens")
    starts = range(0, len(ids) - 1, T)
    windows = [torch.tensor(ids[s:s + T + 1]) for s in starts]

    def batches():  # the last window is shorter: pad its targets with -1 (no byte, no loss)
        for k in range(0, len(windows), batch_size):
            group = windows[k:k + batch_size]
            width = max(len(w) - 1 for w in group)
            x = torch.zeros(len(group), width, dtype=torch.long)
            y = torch.full((len(group), width), -1, dtype=torch.long)
            for row, w in enumerate(group):
                x[row, :len(w) - 1], y[row, :len(w) - 1] = w[:-1], w[1:]
            yield x, y
    return evaluate(model, batches(), token_byte_counts(tokenizer), rt)


def eval_main(argv):
    cfg = parse_config(EvalConfig, argv, prog="train_gpt.py eval",
                       description="Print the bits per byte a checkpoint needs to encode a text file.")
    if not cfg.text:
        raise UserError("eval needs --text FILE")
    try:
        text = data.read_text_file(cfg.text)  # not UTF-8: one line with the file and the byte
    except OSError as e:
        raise UserError(f"cannot read --text {cfg.text}: {e.strerror or e}") from None
    rt = setup_runtime(cfg.device)
    model, tokenizer, meta = load_checkpoint(cfg.checkpoint, device=rt.device)
    res = text_bpb(model, tokenizer, text, cfg.batch_size, rt)
    print(f"{cfg.text}: {len(text.encode()):,} bytes, {res['bpb']:.4f} bits per byte "
          f"(loss {res['loss']:.4f} nats/token; {meta['stage']} checkpoint at step {meta['step']})")


@dataclass
class DemoConfig:
    checkpoint: str = opt(os.path.join("out", "base"), "checkpoint to nudge (an untrained model if none)")
    text: str = opt("To be, or not to be, that is the question",
                    "the example: the model sees all but its last token and is trained to predict the last")
    lr: float = opt(0.05, "learning rate of the single SGD step", low=0)
    top: int = opt(8, "how many of the likeliest next tokens to show", low=1)


def demo_main(argv):
    """The lecture's "nudge": the next-token distribution for one short context, before and after one
    gradient step on that single example. The true next token gains probability; the rest lose some."""
    cfg = parse_config(DemoConfig, argv, prog="train_gpt.py demo", description=demo_main.__doc__)
    if os.path.exists(checkpoint_file(cfg.checkpoint)):
        model, tokenizer, _ = load_checkpoint(cfg.checkpoint)
        print(f"model: {checkpoint_file(cfg.checkpoint)}")
    else:
        tokenizer = Tokenizer.load(data.prepare_default()["tokenizer"])
        model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size))
        print(f"model: untrained (no checkpoint at {cfg.checkpoint}), so its guesses are close to uniform")
    ids = tokenizer.encode(cfg.text)[-model.config.seq_len - 1:]
    if len(ids) < 2:
        raise UserError(f"--text {cfg.text!r} must be at least 2 tokens long")
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    target = ids[-1]

    def next_probs():
        with torch.no_grad():
            return model(x)[0][0, -1].softmax(-1)

    before = next_probs()
    model.zero_grad()
    model(x, y)[1].backward()  # the loss at every position of the example, as in training
    with torch.no_grad():
        for p in model.parameters():
            p -= cfg.lr * p.grad
    after = next_probs()
    shown = list(dict.fromkeys(before.topk(cfg.top).indices.tolist() + [target]))
    print("context: " + " ".join(f"[{tokenizer.decode([i])}]" for i in ids[:-1]))
    print(f"next-token probabilities before -> after one SGD step (lr {cfg.lr}) towards the true next token:")
    for i in shown:
        mark = "  <- the true next token" if i == target else ""
        print(f"  {tokenizer.decode([i])!r:>16} {100 * before[i]:6.2f}% -> {100 * after[i]:6.2f}%{mark}")


def main(argv):
    commands = {"eval": eval_main, "demo": demo_main, "report": report_main}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    cfg = parse_config(TrainConfig, argv, PRESETS, prog="train_gpt.py",
                       description=__doc__ + "\nsubcommands: eval (--help), demo (--help), report [DIR]")
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
