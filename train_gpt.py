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
import ctypes
import dataclasses
import gc
import glob
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from tokenizer import Tokenizer, available_cpus

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
    pointer_dim: int = 0  # width of the pointer's queries and keys (see "The pointer"); 0 = no pointer
    value_embeds: int = 0  # value-embedding tables (see "Value embeddings"); block i uses table i % value_embeds


def rms_norm(x):
    """Rescale each vector to unit root-mean-square. Keeps activations at a steady size through the depth
    of the network, so no layer's output can blow up or vanish. (No learnable gain: it is not needed
    when the next layer is a matrix that can learn any scale itself.)"""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len, head_dim, base):
    """Rotary position embedding (RoPE): position p rotates each pair of channels of a query/key by the
    angle p * frequency. The dot product of a rotated query and a rotated key then depends only on how far
    apart they are -- attention sees *relative* positions, and no position vectors have to be learned.
    -> (cos, sin), each (seq_len, 1, head_dim): channel i and channel i + head_dim/2 form one pair and share
    an angle; sin carries the rotation's sign (+ for the first half, - for the second), and the 1 broadcasts
    over the heads, so that apply_rotary is two products and a sum."""
    freqs = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # fast ... slow
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)  # (seq_len, head_dim/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1)[:, None], torch.cat([sin, -sin], dim=-1)[:, None]


def apply_rotary(x, cos, sin):
    """Rotate x (B, T, heads, head_dim): each pair (x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin). cos, sin:
    rotary_tables' rows for these positions, (T, 1, head_dim), or one set per row (B, T, 1, head_dim). With
    the halves swapped, [x2, x1], both formulas are one product each: x * [cos, cos] + [x2, x1] * [sin, -sin].
    (Whole-vector products instead of four half-vector ones and a join: the same numbers in half the
    operations, and a decoding step of the tiny model is hundreds of tiny operations whose count is its cost.)"""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([x2, x1], dim=-1) * sin).type_as(x)


class KVCache:
    """Memory for incremental decoding. When generating, token t+1 needs the keys and values of all the
    tokens before it; recomputing them every step would cost O(T^2). The cache keeps each layer's keys and
    values, so each new token costs one small forward pass. It holds `length` positions (default: the whole
    context window): a caller that knows how long its prompts and replies can get asks for no more, since
    the cache is most of the memory that sampling takes."""

    def __init__(self, config, batch_size, device, dtype=torch.float32, pad=None, length=None):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_kv_head, length or config.seq_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # how many tokens are stored; also the position of the next token
        # Prompts of different lengths in one batch are left-padded: row b starts with pad[b] filler
        # tokens that nothing attends to and that take no position, so each row computes exactly what it
        # would alone. None = no padding.
        self.pad = None if pad is None else torch.as_tensor(pad, dtype=torch.long, device=device)
        self.last_embedding = None  # (B, 1, n_embd): the newest token's embedding, which smear mixes forward
        # the pointer's memory (see "The pointer"): every position's pointer key and token id
        length = length or config.seq_len
        self.pointer_keys = torch.zeros(batch_size, length, config.pointer_dim, device=device, dtype=dtype)
        self.tokens = torch.zeros(batch_size, length, dtype=torch.long, device=device)

    @property
    def length(self):
        return self.keys.size(3)

    def repeat_rows(self, n, length=None):
        """Each row n times over (row b becomes rows b*n .. b*n+n-1), in a cache of `length` positions
        (default: the same): prefill a prompt once, into a cache just long enough for it, then sample n
        different continuations of it. With n = 1 and the same length nothing is copied."""
        length = length or self.length
        if n == 1 and length == self.length:
            return
        shape = (self.keys.size(0), self.keys.size(1) * n, *self.keys.shape[2:3], length, self.keys.size(4))
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(shape)
            new.unflatten(1, (old.size(1), n))[:, :, :, :, :self.pos] = old[:, :, None, :, :self.pos]
            setattr(self, name, new)
        for name in ("pointer_keys", "tokens"):  # (B, positions, ...): the same, one dimension further in
            old = getattr(self, name)
            new = old.new_zeros((old.size(0) * n, length, *old.shape[2:]))
            new.unflatten(0, (old.size(0), n))[:, :, :self.pos] = old[:, None, :self.pos]
            setattr(self, name, new)
        if self.pad is not None:
            self.pad = self.pad.repeat_interleave(n)
        if self.last_embedding is not None:
            self.last_embedding = self.last_embedding.repeat_interleave(n, dim=0)

    def store(self, layer, k, v):
        """Append this step's keys/values (B, kv_heads, T, head_dim) for one layer; return everything
        stored so far for that layer. GPT.forward advances `pos` once all layers have stored."""
        T = k.size(2)
        end = self.pos + T
        if end > self.length:
            raise ValueError(f"{end} tokens exceed the KV cache's {self.length} positions")
        # narrow() + copy_() rather than slice assignment: the same copy, with less Python indexing work at
        # every layer of every decoding step, where the tensors are tiny and the overhead is the cost.
        keys, values = self.keys[layer], self.values[layer]
        keys.narrow(2, self.pos, T).copy_(k)
        values.narrow(2, self.pos, T).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def store_pointer(self, keys, idx):
        """Append the pointer keys (B, T, pointer_dim) and token ids (B, T) of the T positions that ended at
        `pos` (GPT.forward calls this after the blocks advanced it); return all of both stored so far."""
        start = self.pos - idx.size(1)
        self.pointer_keys.narrow(1, start, idx.size(1)).copy_(keys)
        self.tokens.narrow(1, start, idx.size(1)).copy_(idx)
        return self.pointer_keys[:, :self.pos], self.tokens[:, :self.pos]


def sampling_bytes(config, prompts, n, prompt_tokens, new_tokens, item_bytes=4):
    """Estimated peak memory of sampling n continuations of `new_tokens` tokens for each of `prompts`
    prompts of up to `prompt_tokens` tokens, with activations of `item_bytes` bytes (2 for bfloat16):
      * the KV caches: the prompts' (prefilled once), then the n copies, as long as prompt + reply;
      * the prefill's logits: one vocabulary-wide row per prompt position, in the compute dtype and as the
        float32 soft-capped copy (the widest tensors of all at a big vocabulary), plus its activations;
      * one decoding step's logits, float32, and the few copies sampling makes of them.
    The weights are not included: the caller holds them whatever it samples."""
    per_position = 2 * config.n_layer * config.n_kv_head * (config.n_embd // config.n_head) * item_bytes
    length = min(prompt_tokens + new_tokens, config.seq_len)
    cache = prompts * n * length * per_position + (prompts * prompt_tokens * per_position if n > 1 else 0)
    prefill = prompts * prompt_tokens * (config.vocab_size * (item_bytes + 8) + 12 * config.n_embd * item_bytes)
    decode = prompts * n * config.vocab_size * 4 * 4
    return cache + prefill + decode


def kept_without_autograd(module, weights, build):
    """build() -> a tensor made from `weights` (parameters): under autograd (training) made afresh at every
    call, so gradients flow; without it (sampling) made once and kept on `module` until one of the weights
    changes (an optimizer step or a load writes them in place, which bumps their version counters). Sampling
    asks for such tensors at every token, where making them again would cost more than using them."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return build()
    key = tuple((w.data_ptr(), w._version) for w in weights)
    if module._kept[0] != key:
        module._kept = (key, build())
    return module._kept[1]


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
        self._kept = (None, None)  # the joined q/k/v weights while sampling (see queries_keys_values)
        if config.value_embeds:
            self.value_scale = nn.Parameter(torch.full((1,), VALUE_EMBED_START))

    def queries_keys_values(self, x, cos, sin):
        """x (B, T, n_embd) -> q (B, T, heads, head_dim), k and v (B, T, kv_heads, head_dim), q and k
        normalised and rotated. QK-norm: normalising queries and keys bounds their dot products, so
        attention logits cannot grow without limit and saturate the softmax (a common cause of training
        instability)."""
        B, T, _ = x.shape
        if torch.is_grad_enabled():
            q = self.q(x).view(B, T, self.n_head, self.head_dim)
            k = self.k(x).view(B, T, self.n_kv_head, self.head_dim)
            v = self.v(x).view(B, T, self.n_kv_head, self.head_dim)
            return apply_rotary(rms_norm(q), cos, sin), apply_rotary(rms_norm(k), cos, sin), v
        # Sampling: one token at a time, where a step's cost is its number of operations, not their size.
        # The three projections run as one product with the weights joined, and the queries and keys are
        # normalised and rotated together: the same numbers as above, in a third of the operations.
        # (Training keeps three products: their input gradients would add up in another order.)
        weight = kept_without_autograd(self, (self.q.weight, self.k.weight, self.v.weight),
                                       lambda: torch.cat([self.q.weight, self.k.weight, self.v.weight]))
        qkv = F.linear(x, weight).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)
        qk, v = qkv.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=2)
        q, k = apply_rotary(rms_norm(qk), cos, sin).split([self.n_head, self.n_kv_head], dim=2)
        return q, k, v

    def forward(self, x, cos, sin, kv_cache, value_embed=None):
        B, T, _ = x.shape
        q, k, v = self.queries_keys_values(x, cos, sin)
        if value_embed is not None:  # see "Value embeddings"
            v = v + self.value_scale * value_embed.view_as(v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if kv_cache is not None:
            k, v = kv_cache.store(self.layer_idx, k, v)
        gqa = self.n_kv_head != self.n_head  # several query heads share one key/value head
        pad = kv_cache.pad if kv_cache is not None else None
        if pad is None and (k.size(2) == T or T == 1):
            # No earlier tokens: the plain causal (lower-triangular) mask. Or one new token, which may see
            # every key stored so far: no mask at all (building one in every layer at every decoding step
            # was a tenth of the step's time in a small model).
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
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

    def forward(self, x, cos, sin, kv_cache, value_embed=None):
        x = x + self.attn(rms_norm(x), cos, sin, kv_cache, value_embed)
        return x + self.mlp(rms_norm(x))


# Smear: before the first block, each token's vector takes in a gated share of the previous token's.
# Copying from the context ("the word after 'in' goes into the call") needs every position to know which
# token came before it. A transformer can learn that with a previous-token attention head, but the tiny
# model trained for minutes does not (its loss on a passage repeated in the same window is no lower the
# second time: 6.03 vs 5.94 nats). With smear that knowledge is in the vectors from the start. Measured on
# the tiny pipeline (BENCHMARKS.md, "Smear"): val 2.1800 -> 2.1626 bits per byte, and SFT on nothing but
# copy tasks put the user's word into the call in 25 of 40 held-out prompts instead of 9.
# The gate (one weight per leading channel, sigmoid) decides per token how much of its predecessor to
# take; the scale starts at 0, so training begins with no smear at all (modded-nanogpt's "smear" trick).
SMEAR_GATE_CHANNELS = 16

# The copy path: the output head also scores every token by how much the final vector looks like that
# token's own (normalised) input embedding, times a learned scale that starts at 0. Copying a word from the
# context means attention moves the word's vector forward and the head turns it back into the same word;
# with an untied head that needs head row i to match embedding row i for every token, which a short
# training never arranges (on the tiny base, the best linear map from embeddings through the head recovers
# the token itself for 18% of the vocabulary). GPT-2 tied the two tables, which gives copying for free but
# makes one table serve both jobs; the copy path adds the tied scores to the untied ones instead.

# The pointer: a second way to name the next token, by pointing at an earlier position of the context and
# copying the token that followed it there. Position i scores every earlier position p by a query of its
# final vector against a key of p's (q_i . k_p), a softmax turns the scores into weights, and the weights
# of all positions followed by token v add up to the pointer's probability of v. A learned gate g_i mixes it
# with the head's: p(v) = (1 - g_i) softmax(logits)_v + g_i pointer_v. This is the "continuous cache" of
# Grave et al. (2017) and the copying of pointer-generator networks (See et al., 2017): "this context looks
# like the one before that earlier word, so the next token is what came next there" is an induction head
# built in, where the network itself must otherwise grow one from two layers of attention that happen to
# line up. The tiny model trained for minutes never grows one (BENCHMARKS.md, "Smear"), and copying the
# user's word into a code call ("How many r's in strawberry") is exactly this lookup. With the pointer, the
# model returns log-probabilities instead of logits: the same thing to every caller (softmax, sampling,
# cross-entropy), since log-probabilities are logits that are already normalised. The GPU presets leave it
# off (their models grow induction heads, and its (T x T) weights per sequence are not worth their memory).
POINTER_GATE_START = -2.0  # sigmoid(-2) = 0.12: the head's distribution dominates at the start


# Value embeddings: a second lookup table from token id to a vector, added to the values of every block's
# attention (v = W_v x + value_scale x table[token]), an idea of modded-nanogpt and nanochat. Attention mostly
# moves information about *which tokens* came before; with the table, what a token passes on when it is
# attended to can be about the token itself from the first step, whatever the layers below made of it. It costs
# a lookup and an add per block (the table has as many parameters as the head when keys and values are full
# width, but a lookup is not a product), and AdamW trains it like the token embedding. Measured on the 5 MB
# Gutenberg text (BENCHMARKS.md, "Value embeddings"): one table shared by the four blocks, 1.8978 -> 1.8888
# bits per byte for 3% more time; one table per block learned no more (1.8904). Yet it is off by default
# (--value-embeds 1 turns it on): SFT from such a base (4,096-token batches, 400 steps) answered the
# Emily-with-code prompts right 0.50 and 0.45 of the time (two seeds) against 0.80 from the same run without
# the table, and word problems 0.075-0.10 against 0.15; freezing the table in SFT made it worse (0.275), and a
# 3x faster table did not help (0.35, 0.55). The GPU presets leave it off too: a 32K-vocabulary table is ~40M
# parameters, and it has not been measured there.
VALUE_EMBED_START = 0.5  # value_scale at the start: the table adds half its (unit-spread) entries to each value
LOSS_CHUNK_TOKENS = 8192  # rows of the output head computed at once in the loss (the tiny preset's micro-batch)

# The loss on a CPU: a micro-batch's logits are a big table (8,192 rows x 4,096 scores = 134 MB for the tiny
# preset), and the plain softcap + cross-entropy reads and writes it a dozen times (tanh, the scale, the
# log-softmax, and their gradients, each its own pass). A CPU does each pass at memory speed, so those
# passes took a third of a tiny training step. SoftcapCrossEntropy does the same sums a few rows at a time,
# each piece small enough to stay in the core's cache while all its steps run, and reuses the table's own
# memory for its gradient. (torch.compile fuses these steps itself, on a GPU or a CPU; there the plain code
# runs, as it does on every GPU.)
CACHE_ROWS_BYTES = 1 << 19  # ~512 KB of logits per piece: well inside a core's L2 cache


class SoftcapCrossEntropy(torch.autograd.Function):
    """Cross-entropy of softcapped logits, computed in place. Input: `scaled` (N, vocab) = head(x) / softcap
    before the tanh (it is overwritten), targets (N,) (all >= 0), the softcap c. Output: (N,) losses, and
    the overwritten table (only so autograd knows it changed; callers ignore it).

    Forward, per row: z = c tanh(scaled), m = max_v z_v, loss = (m - z_target) + log(sum_v exp(z_v - m)).
    (Softcapped scores are below c = 15, so exp could not overflow even without m. m is there for precision:
    a confident row's loss is a tiny number, and as the difference of log(sum exp z) ~ 15 and z_target ~ 15
    in float32 it would keep only two digits; as m - z_target = 0 plus the log of a sum near 1 it keeps all.)
    Backward, per row: d loss / d z = softmax(z) - onehot(target), and d z / d scaled = c (1 - tanh^2) =
    c - z^2 / c, so the gradient is their product, times the caller's gradient of each row's loss."""

    @staticmethod
    def forward(ctx, scaled, targets, c):
        rows = max(1, CACHE_ROWS_BYTES // (4 * scaled.size(1)))
        top, log_sum = torch.empty(2, scaled.size(0), device=scaled.device)
        for start in range(0, scaled.size(0), rows):
            z = scaled[start:start + rows].tanh_().mul_(c)  # the piece becomes z, in place
            top[start:start + rows] = z.amax(-1)
            log_sum[start:start + rows] = (z - top[start:start + rows, None]).exp_().sum(-1).log_()
        losses = (top - scaled.gather(1, targets[:, None]).squeeze(1)) + log_sum
        ctx.mark_dirty(scaled)
        ctx.save_for_backward(scaled, top, log_sum, targets)
        ctx.c, ctx.rows = c, rows
        ctx.set_materialize_grads(False)  # no table of zeros for the unused second output's gradient
        return losses, scaled

    @staticmethod
    def backward(ctx, grad_losses, _):
        z_all, top, log_sum, targets = ctx.saved_tensors
        c, rows = ctx.c, ctx.rows
        for start in range(0, z_all.size(0), rows):
            z, end = z_all[start:start + rows], start + rows
            grad_z = (z - top[start:end, None]).sub_(log_sum[start:end, None]).exp_()  # softmax(z)
            grad_z.scatter_add_(1, targets[start:end, None], torch.full((z.size(0), 1), -1.0, device=z.device))
            grad_z.mul_(grad_losses[start:end, None])
            z.mul_(z).mul_(-1 / c).add_(c).mul_(grad_z)  # the piece becomes the gradient of `scaled`, in place
        return z_all, None, None


class GPT(nn.Module):
    """The whole expression: token ids (B, T) -> logits (B, T, vocab_size), one score per possible next
    token at every position. softmax(logits) is the model's probability distribution over the next token."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token id -> vector (a lookup table)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # vector -> logits; untied
        kv_width = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleList(nn.Embedding(config.vocab_size, kv_width)  # see "Value embeddings"
                                          for _ in range(config.value_embeds))
        # smear's weights (see SMEAR_GATE_CHANNELS) are plain zero tensors, not an nn.Linear: building them
        # draws no random numbers, so they leave the random start of every other layer as it was
        self.smear_gate = nn.Parameter(torch.zeros(SMEAR_GATE_CHANNELS))
        self.smear_scale = nn.Parameter(torch.zeros(1))
        self.copy_scale = nn.Parameter(torch.zeros(1))  # see "The copy path" above
        self._kept = (None, None)  # the head's weights while sampling (see head_weight)
        if config.pointer_dim:  # see "The pointer" above
            self.pointer_q = nn.Linear(config.n_embd, config.pointer_dim, bias=False)
            self.pointer_k = nn.Linear(config.n_embd, config.pointer_dim, bias=False)
            self.pointer_gate = nn.Parameter(torch.zeros(config.n_embd))
            self.pointer_gate_bias = nn.Parameter(torch.zeros(1))
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
        for table in self.value_embeds:  # the spread of a value computed from a normalised vector
            nn.init.normal_(table.weight, std=1.0)
        for block in self.blocks:
            for lin in (block.attn.q, block.attn.k, block.attn.v, block.mlp.fc):
                nn.init.uniform_(lin.weight, -(3 / n) ** 0.5, (3 / n) ** 0.5)  # std 1/sqrt(fan_in)
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.mlp.proj.weight)
        nn.init.normal_(self.lm_head.weight, std=0.001)  # near-uniform first guesses: loss starts ~ln(vocab)
        nn.init.zeros_(self.smear_gate)
        nn.init.zeros_(self.smear_scale)
        nn.init.zeros_(self.copy_scale)
        if self.config.pointer_dim:  # a zero query: the pointer starts by weighting the context evenly
            nn.init.zeros_(self.pointer_q.weight)
            nn.init.uniform_(self.pointer_k.weight, -(3 / n) ** 0.5, (3 / n) ** 0.5)
            nn.init.zeros_(self.pointer_gate)
            nn.init.constant_(self.pointer_gate_bias, POINTER_GATE_START)

    def forward(self, idx, targets=None, kv_cache=None, reduction="mean"):
        """idx: (B, T) token ids. targets: (B, T) next-token ids, -1 where no loss should be taken.
        kv_cache: when given, idx continues the tokens already in the cache (incremental decoding).
        Without targets -> (logits (B, T, vocab) in float32, None); with the pointer they are log-probabilities.
        With targets -> (None, loss): the mean cross-entropy over the scored positions, or with reduction="none"
        the (B, T) loss of every position (0 where the target is -1). The logits are then never held for the
        whole batch at once (see head_loss), which is what lets a 32K-65K vocabulary fit on a GPU."""
        x = self.hidden_states(idx, kv_cache)
        if targets is None:
            logits = self.head(x)
            return (self.pointer_mix(logits, x, idx, kv_cache) if self.config.pointer_dim else logits), None
        losses = self.head_loss(x.flatten(0, 1), targets.reshape(-1)).view_as(targets)
        if self.config.pointer_dim:
            losses = self.pointer_loss(losses, x, idx, targets)
        if reduction == "none":
            return None, losses
        return None, losses.sum() / (targets >= 0).sum()  # 0/0 = nan when nothing is scored, as F.cross_entropy

    def head(self, x, weight=None):
        """Vectors -> float32 logits. Soft-cap: logits = softcap * tanh(head(x) / softcap) squashes them into
        (-softcap, softcap) smoothly; the model cannot become infinitely sure of anything, which keeps the
        loss and its gradients tame. (The head is linear, so dividing its n_embd-wide input instead of its
        vocab-wide output gives the same numbers with far less memory traffic: ~5% faster steps on a CPU.)
        `weight`: head_weight(), when the caller has worked it out once for many calls."""
        return self.config.softcap * torch.tanh(self.head_scaled(x, weight))

    def head_scaled(self, x, weight=None):
        """The head's float32 scores before the soft-cap's tanh: head(x) = softcap * tanh(head_scaled(x))."""
        weight = self.head_weight() if weight is None else weight
        return F.linear(x / self.config.softcap, weight.to(x.dtype)).float()

    def head_weight(self):
        """The head's own weights plus the copy path's share of the normalised embedding table. Sampling
        asks for it at every token, and normalising the whole table took longer than the rest of a tiny
        model's decoding step, so without autograd the table is kept (kept_without_autograd)."""
        return kept_without_autograd(self, (self.lm_head.weight, self.wte.weight, self.copy_scale),
                                     lambda: self.lm_head.weight + self.copy_scale * rms_norm(self.wte.weight))

    def head_loss(self, x, targets):
        """Cross-entropy = -log(probability given to the true next token), for each of the N rows of x (N,
        n_embd) -> (N,) float32, 0 where the target is -1. The logits of one row take vocab_size x 4 bytes:
        for a d12 micro-batch (32 x 2048 tokens, 32K vocabulary) the whole batch's would be 8 GiB, plus as
        much again for their gradient. So rows go through the head LOSS_CHUNK_TOKENS at a time, and under
        autograd each chunk is "checkpointed": its logits are thrown away after the loss and recomputed in
        the backward pass, one chunk at a time (costing one more head multiply, ~3-8% of a GPU step)."""
        def chunk_loss(xc, tc, weight):
            if xc.device.type != "cpu" or torch.compiler.is_compiling():
                return F.cross_entropy(self.head(xc, weight), tc, ignore_index=-1, reduction="none")
            scaled = self.head_scaled(xc, weight)
            losses, _ = SoftcapCrossEntropy.apply(scaled, tc.clamp(min=0), self.config.softcap)
            return torch.where(tc >= 0, losses, 0.0)  # a -1 target scores nothing (and passes no gradient)
        weight = self.head_weight()  # once for all chunks: it is a whole vocab x n_embd table
        if x.size(0) <= LOSS_CHUNK_TOKENS:  # one chunk: nothing to save, the plain computation
            return chunk_loss(x, targets, weight)
        recompute = torch.is_grad_enabled()
        return torch.cat([torch.utils.checkpoint.checkpoint(chunk_loss, xc, tc, weight, use_reentrant=False)
                          if recompute else chunk_loss(xc, tc, weight)
                          for xc, tc in zip(x.split(LOSS_CHUNK_TOKENS), targets.split(LOSS_CHUNK_TOKENS))])

    def pointer_scores(self, x, keys):
        """The pointer's float32 scores (B, T, P) of T positions' vectors x against P positions' keys."""
        q = self.pointer_q(x).float()
        return q @ keys.float().transpose(1, 2) / self.config.pointer_dim ** 0.5

    def pointer_gate_logit(self, x):
        return (x.float() @ self.pointer_gate.float()) + self.pointer_gate_bias.float()  # (B, T)

    def pointer_loss(self, head_losses, x, idx, targets):
        """Training: the head's per-position cross-entropy (B, T) -> the mixture's (see "The pointer"). Only
        the pointer's probability of each target is needed: the weights of the earlier positions p whose
        next token idx[p + 1] is the target. Position 0 has nothing before it to point at (gate 0 there)."""
        T = idx.size(1)
        never = -1e4  # a finite "minus infinity": log-sum-exps of nothing but these stay finite, as do gradients
        scores = self.pointer_scores(x, self.pointer_k(x))[:, :, :T - 1]  # key p is followed by idx[p + 1]
        earlier = torch.ones(T, T - 1, dtype=torch.bool, device=x.device).tril(diagonal=-1)  # p < i
        scores = scores.masked_fill(~earlier, never)
        hits = idx[:, None, 1:] == targets[:, :, None]  # (B, T, T - 1): key p's next token is i's target
        log_pointer = scores.masked_fill(~hits, never).logsumexp(-1) - scores.logsumexp(-1)
        # log g and log(1 - g), with the gate shut (g = 0) at position 0
        gate, first = self.pointer_gate_logit(x), torch.arange(T, device=x.device) == 0
        log_gate = F.logsigmoid(gate).masked_fill(first, never)
        log_head_share = F.logsigmoid(-gate).masked_fill(first, 0)
        log_p = torch.logaddexp(log_head_share - head_losses, log_gate + log_pointer)  # log((1-g) p_head + g p_ptr)
        return torch.where(targets >= 0, -log_p, 0.0)

    def pointer_mix(self, logits, x, idx, kv_cache):
        """Sampling and scoring: logits (B, T, vocab) -> the mixture's log-probabilities, every token's. The
        keys and tokens of the positions before these come from the cache when decoding; a left-padded row's
        filler is never pointed at."""
        B, T = idx.shape
        keys, tokens = self.pointer_k(x), idx
        if kv_cache is not None:
            keys, tokens = kv_cache.store_pointer(keys, idx)
        P = tokens.size(1)  # positions so far; the new ones are the last T
        probs = logits.softmax(-1)
        if P == 1:  # a one-token sequence: nothing to point at yet
            return probs.log()
        scores, gate = self.pointer_scores(x, keys[:, :P - 1]), torch.sigmoid(self.pointer_gate_logit(x))
        if T == 1 and (kv_cache is None or kv_cache.pad is None):  # decoding: every earlier position is visible
            weights = scores.softmax(-1)  # (the common case, so it builds no masks)
        else:
            query_pos = torch.arange(P - T, P, device=x.device)
            visible = torch.arange(P - 1, device=x.device)[None, :] < query_pos[:, None]  # (T, P - 1): p < i
            visible = visible[None].expand(B, T, P - 1)
            if kv_cache is not None and kv_cache.pad is not None:
                visible = visible & (torch.arange(P - 1, device=x.device) >= kv_cache.pad[:, None])[:, None]
            weights = torch.nan_to_num(scores.masked_fill(~visible, float("-inf")).softmax(-1))  # none visible: 0
            gate = gate * visible.any(-1)
        pointer = torch.zeros_like(probs).scatter_add_(-1, tokens[:, None, 1:].expand(B, T, P - 1), weights)
        return ((1 - gate[..., None]) * probs + gate[..., None] * pointer).log()

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
        padded = kv_cache is not None and kv_cache.pad is not None
        x = self.smear(rms_norm(self.wte(idx)), kv_cache, positions if padded else None)
        tables = [table(idx) for table in self.value_embeds]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, kv_cache, tables[i % len(tables)] if tables else None)
        if kv_cache is not None:
            kv_cache.pos += T
        return rms_norm(x)

    def smear(self, x, kv_cache, positions):
        """x (B, T, n_embd) embeddings -> each plus gate x its predecessor's (see SMEAR_GATE_CHANNELS). The
        first token of a sequence has no predecessor; in decoding, the cache remembers the newest token's
        embedding for the next step; a left-padded row's first real token (position 0) ignores the filler."""
        carried = kv_cache.last_embedding if kv_cache is not None else None
        before = carried if carried is not None else torch.zeros_like(x[:, :1])
        # one new token (decoding): its predecessor is `before` itself, and a cat with nothing would only copy it
        previous = before if x.size(1) == 1 else torch.cat([before, x[:, :-1]], dim=1)
        if positions is not None:
            previous = previous * (positions > 0)[..., None]
        if kv_cache is not None:
            kv_cache.last_embedding = x[:, -1:]
        gate = torch.sigmoid(x[..., :SMEAR_GATE_CHANNELS] @ self.smear_gate)[..., None]
        return x + self.smear_scale * gate * previous

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
    return sample_from(logits.float().softmax(dim=-1), generator)


def sample_from(probs, generator=None):
    """One token per row of probs (B, vocab) -> ids (B, 1), by inverting the running sum: token i owns the
    slice [c[i-1], c[i]) of [0, total), and a uniform draw u in it picks i. (torch.multinomial does the
    same job about 10x slower on a CPU at a 4,096-token vocabulary: it was a quarter of RL's sampling
    time.) A banned token's slice has zero width, so no u lands in it; the one draw that can miss every
    slice, u rounded up to the very end, takes the row's likeliest token instead."""
    cumulative = probs.cumsum(dim=-1)
    u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device) * cumulative[:, -1:]
    ids = torch.searchsorted(cumulative, u, right=True).clamp_(max=probs.size(-1) - 1)
    missed = probs.gather(-1, ids) == 0
    return torch.where(missed, probs.argmax(dim=-1, keepdim=True), ids)


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
    whose update is orthogonalized before it is applied.

    Under data parallelism every process holds the same averaged gradients, so the orthogonalization (a
    few big matrix products per matrix: ~5-14% of a multi-GPU step) would be the same work done `world`
    times. Instead each matrix has one owner process (`owners`: the biggest matrices are dealt out first,
    each to the least loaded process), only the owner keeps its momentum and computes its update, and then
    broadcasts the updated matrix to the others."""

    def __init__(self, params, lr=0.02, momentum=0.95, ns_steps=5, rank=0, world=1):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))
        self.rank, self.world = rank, world
        matrices = [p for group in self.param_groups for p in group["params"]]
        load, self.owners = [0] * world, {}
        for p in sorted(matrices, key=lambda p: -p.numel()):  # a stable sort: the same deal on every process
            owner = load.index(min(load))
            self.owners[p], load[owner] = owner, load[owner] + p.numel()

    @torch.no_grad()
    def step(self):
        broadcasts = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self.owners[p] == self.rank:
                    buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    update = orthogonalize(p.grad + group["momentum"] * buf, group["ns_steps"])  # Nesterov
                    # An orthogonal matrix has entries of size ~1/sqrt(columns); rescale tall matrices so
                    # every shape moves its outputs by about the same amount per step.
                    p.add_(update, alpha=-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)
                if self.world > 1:  # asynchronous: the owners' next matrices are computed meanwhile
                    broadcasts.append(dist.broadcast(p, src=self.owners[p], async_op=True))
        for handle in broadcasts:
            handle.wait()

    def gather_state(self):
        """Before a checkpoint: give every process (rank 0 writes) every matrix's momentum."""
        if self.world == 1:
            return
        for p, owner in self.owners.items():  # the same order on every process
            dist.broadcast(self.state[p].setdefault("momentum", torch.zeros_like(p)), src=owner)

    def drop_foreign_state(self):
        """After a checkpoint was written or read: keep only the momentum of the matrices this process owns."""
        for p, owner in self.owners.items():
            if owner != self.rank:
                self.state[p].pop("momentum", None)


def build_optimizers(model, cfg, device_type, rank=0, world=1):
    """Muon for the matrices inside the blocks (and the pointer's); AdamW for the embedding table and the
    output head (and the value-embedding tables), whose rows belong to individual tokens and see very uneven
    gradients (Muon's whole-matrix view suits them badly), and for the few weights of smear, the copy path,
    the pointer's gate and the value embeddings' scales. Each group remembers its base learning rate, which the
    schedule scales every step."""
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    small = [model.smear_gate, model.smear_scale, model.copy_scale]
    small += [p for p in model.blocks.parameters() if p.ndim < 2]  # the blocks' value_scale, if any
    if model.config.pointer_dim:  # the pointer's query and key are matrices like attention's
        matrices += [model.pointer_q.weight, model.pointer_k.weight]
        small += [model.pointer_gate, model.pointer_gate_bias]
    adam_groups = [dict(params=[model.wte.weight, *[t.weight for t in model.value_embeds]], lr=cfg.embed_lr),
                   dict(params=[model.lm_head.weight], lr=cfg.head_lr),
                   dict(params=small, lr=cfg.head_lr)]
    adamw = torch.optim.AdamW(adam_groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=1e-10, weight_decay=0.0,
                              fused=device_type == "cuda")
    muon = Muon(matrices, lr=cfg.matrix_lr, momentum=cfg.muon_momentum, rank=rank, world=world)
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


# ----------------------------------------------------------------------------------------------------
# The process on a CPU: how many threads, and what the memory allocator does with freed tensors.
# Every stage's CLI goes through run_cli and parse_config, so every stage gets the same policy.

# glibc's malloc gives every block above 32 MiB its own fresh mapping from the kernel and hands it back on
# free(). A training step allocates and frees the same big tensors every time (at the tiny preset the float32
# logits of one micro-batch alone are 32 x 256 x 4,096 x 4 bytes = 134 MB, and their gradient as much again), so
# each step the kernel maps new pages and zero-fills each one at its first touch: ~350,000 page faults a step
# and kernel ("sys") time of a third of the computing ("user") time. With M_MMAP_MAX = 0 malloc takes every
# block from its heap, and with a high M_TRIM_THRESHOLD it keeps freed memory there for the next step instead
# of returning it: the same idea as PyTorch's caching allocator on GPUs. The cost: the process keeps its peak
# memory until it exits (and a little more, as free gaps in the heap are not always reused). BENCHMARKS.md
# ("Issue 19") has the figures: losses identical, sys time ~5x and page faults ~8x lower. It is set here, in code,
# rather than with GLIBC_TUNABLES in the environment, so that a plain `python train_gpt.py` gets it too.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameter numbers (glibc's malloc.h)
KEEP_FREED_MEMORY = True  # bench.py turns it off to measure the difference


def keep_freed_memory():
    """Apply the allocator policy above; True when it was applied (only glibc has mallopt; elsewhere -- macOS,
    Windows, musl -- nothing changes)."""
    if not KEEP_FREED_MEMORY or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def idle_cores(seconds=0.2, stat="/proc/stat"):
    """How many cores nothing else is using right now, from the kernel's per-state CPU time counters in
    /proc/stat sampled `seconds` apart (the idle + iowait share of all the time that passed, times the
    cores) -> a float, or None where there is no /proc/stat (macOS, Windows). Instantaneous on purpose: the
    load average lags by a minute and would still count the pipeline's previous stage."""
    def idle_and_total():
        with open(stat) as f:
            lines = f.read().splitlines()
        cpu = [float(v) for v in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
        cores = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
        return cpu[3] + cpu[4], sum(cpu), cores
    try:
        idle0, total0, cores = idle_and_total()
        time.sleep(seconds)
        idle1, total1, _ = idle_and_total()
    except (OSError, ValueError, IndexError):
        return None
    return cores * (idle1 - idle0) / max(total1 - total0, 1e-9)


IDLE_CORE_SHARE = 0.75  # a core counts as free when it was idle at least this much of the sample


def cpu_threads():
    """How many threads torch computes with on the CPU: as many as there are idle cores when the stage
    starts. torch's own default is one per core, and every operation is split between them: when another
    program (a browser, an editor, a second job) holds a core, each operation waits for the thread that
    lost its core. On 2 cores, 2 threads beside one busy process made the stages 1.2-4.5x slower than 1
    thread, while on an idle machine the second thread gained 1.5-1.8x (BENCHMARKS.md, "Issue 19"): no fixed
    count is fast in both, a measured one is. Without /proc/stat, one core is left to the rest of the
    machine. OMP_NUM_THREADS (which torchrun sets to 1 when it starts several processes on one machine)
    takes precedence, and a stage's --threads flag over both (see parse_config)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores, idle = available_cpus(), idle_cores()
    if idle is None:
        return max(1, cores - 1)
    return max(1, min(cores, int(idle + 1 - IDLE_CORE_SHARE)))  # 1.8 idle cores -> 2 threads; 1.6 -> 1


def run_cli(main_fn, argv=None):
    """Run a stage's main with the process policy above (allocator, default threads); turn UserError into
    one clear line on stderr and exit code 2."""
    keep_freed_memory()
    torch.set_num_threads(cpu_threads())
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
    parser.add_argument("--threads", type=int, default=0, metavar="INT",
                        help="torch threads on the CPU (default: 0 = automatic: as many as there are idle cores "
                             "when the stage starts, see train_gpt.cpu_threads)")
    for f in fields(cls):
        flags = ["--" + f.name.replace("_", "-")] + ([aliases[f.name]] if aliases and f.name in aliases else [])
        help = f"{f.metadata.get('help', '')} (default: {f.default})"
        if isinstance(f.default, bool):
            if f.name.startswith("no_"):  # argparse reads --no-X as X=False: a bool named no_X could never be set
                raise TypeError(f"{cls.__name__}.{f.name}: name the bool for what it turns on (--no-X is its off)")
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        elif isinstance(f.default, tuple):
            parser.add_argument(*flags, nargs="*", default=argparse.SUPPRESS, metavar="X", help=help)
        else:
            kind = str if f.default is None else type(f.default)
            parser.add_argument(*flags, type=kind, default=argparse.SUPPRESS, metavar=kind.__name__.upper(),
                                help=help)
    args = vars(parser.parse_args(argv))
    threads = args.pop("threads")
    if threads < 0:
        raise UserError(f"--threads must be at least 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)  # a process-wide setting, not part of the stage's config
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

    @property
    def where(self):
        """The device as the stages print it: on a CPU with its thread count (see cpu_threads)."""
        return f"cpu ({torch.get_num_threads()} threads)" if self.device.type == "cpu" else str(self.device)

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


@contextlib.contextmanager
def distributed_stage():
    """Around a stage's main: leave the process group cleanly when torchrun started one. On success, every
    process first waits for the others (rank 0 is often still writing its files: gloo aborts a process whose
    peer is torn down under it); after an error nobody waits, since the others may already be gone."""
    try:
        yield
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    if dist.is_initialized():
        gc.collect()  # objects holding collective work (DDP's reducer sits in reference cycles) go first...
        dist.barrier()
        dist.destroy_process_group()  # ...then the group: never the other way round, at interpreter exit


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


def all_reduce_grads(model, rt):
    """all_reduce_mean over a model's gradients, for stages whose processes may have had nothing to learn
    from in a step (RL: no attempt of theirs had a non-zero weight): their missing gradients count as zeros,
    so every process still joins the same all-reduce and applies the same update."""
    if rt.world == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_mean([p.grad for p in params], rt)


def only_master_prints():
    """A context in which the processes other than rank 0 print nothing (under torchrun every process runs
    the same code; one of them speaks). The rank is torchrun's, read before any process group exists."""
    if int(os.environ.get("RANK", 0)) == 0:
        return contextlib.nullcontext()
    return contextlib.redirect_stdout(open(os.devnull, "w"))


def gather_lists(items, rt):
    """Every process's list, concatenated in rank order, on every process (small things: rewards, texts)."""
    if rt.world == 1:
        return list(items)
    lists = [None] * rt.world
    dist.all_gather_object(lists, list(items))
    return [item for part in lists for item in part]


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
            _, loss = model(x, y, reduction="none")
        y, loss = y.reshape(-1), loss.reshape(-1).double()
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
    # A checkpoint from before smear (or the copy path) existed holds none of its weights: it loads with the
    # scale left at 0, which is that model exactly (its vectors get nothing of their predecessors', its head
    # nothing of the embedding table).
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    if unexpected or set(missing) - {"smear_gate", "smear_scale", "copy_scale"}:
        model.load_state_dict(model_state)  # the strict load, for its own error message
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
    pointer_dim: int = opt(32, "width of the pointer's queries and keys (GPT's \"The pointer\"; 0 = none)", low=0)
    value_embeds: int = opt(0, "value-embedding tables shared by the blocks (GPT's \"Value embeddings\"; 0 = none)",
                            low=0)
    # the data
    shards: str = opt("", "train on a shard set made by `python data.py tokenize`: its folder, or NAME under "
                          "out/shards")
    input: tuple = opt((), "train on these text files instead of the embedded corpus")
    val_input: tuple = opt((), "held-out text files for --input (default: the last 10%% of each --input file)")
    tokenizer: str = opt("", "tokenizer.json to use (default: the one data.py prepares)")
    out_dir: str = opt(os.path.join("out", "base"), "where the checkpoint, logs and metrics go", path="out")
    # the batch: batch_size windows of seq_len tokens per process per micro-step; micro-steps are
    # accumulated until total_batch_tokens tokens have been seen, then the optimizer steps once. The tiny
    # preset takes many small steps: a few minutes see only ~1.6M tokens, and on them 400 steps of 4,096
    # tokens learned more than 220 of 8,192 for less time (BENCHMARKS.md, "Quality per second", session 14)
    batch_size: int = opt(16, "windows per process per micro-step", low=1)
    total_batch_tokens: int = opt(4096, "tokens per optimizer step, over all processes and micro-steps", low=1)
    num_steps: int = opt(400, "optimizer steps", low=1)
    # the optimizer. Smaller steps want a smaller Muon rate: at 4,096 tokens a step 0.03 reached 1.8986 bits
    # per byte on the 5 MB Gutenberg text, 0.04 1.9132, 0.025 1.8984, 0.02 1.9000 (the AdamW rates made no
    # difference; 0.03 kept, the rate the whole pipeline was measured with)
    matrix_lr: float = opt(0.03, "Muon learning rate for the matrices inside the blocks", low=0)
    embed_lr: float = opt(0.3, "AdamW learning rate for the token embedding", low=0)
    head_lr: float = opt(0.008, "AdamW learning rate for the output head", low=0)
    muon_momentum: float = opt(0.95, "Muon momentum", low=0, high=1)
    adam_beta1: float = opt(0.8, "AdamW beta1", low=0, high=1)
    adam_beta2: float = opt(0.95, "AdamW beta2", low=0, high=1)
    warmup_steps: int = opt(10, "linear learning-rate warmup", low=0)
    warmdown_frac: float = opt(0.5, "fraction of steps at the end with a linearly decaying learning rate",
                               low=0, high=1)
    final_lr_frac: float = opt(0.0, "learning rate at the last step, as a fraction of the peak", low=0, high=1)
    grad_clip: float = opt(0.0, "clip the gradient norm to this (0 = no clipping)", low=0)
    # watching it learn
    eval_every: int = opt(200, "steps between validation evaluations (0 = only at the end)", low=0)
    eval_tokens: int = opt(32768, "validation tokens per intermediate evaluation (the final one reads all)", low=1)
    sample_every: int = opt(100, "steps between generated samples (0 = never)", low=0)
    sample_tokens: int = opt(64, "tokens per generated sample", low=1)
    save_every: int = opt(100, "steps between checkpoints, so a killed run can --resume (0 = only at the end)", low=0)
    # where and how
    device: str = opt("auto", "cuda, mps, cpu, or auto")
    dtype: str = opt("auto", "autocast dtype: auto (bfloat16 on CUDA), float32, bfloat16",
                      choices=("auto", "float32", "bfloat16"))
    compile: str = opt("auto", "torch.compile: auto (on CUDA only), on, off", choices=("auto", "on", "off"))
    seed: int = opt(1337, "random seed; the same seed gives the same run on CPU")
    resume: bool = opt(False, "continue from the checkpoint in out_dir")
    # the plan
    dry_run: bool = opt(False, "print the plan (size, tokens, shards, memory per GPU, time) and exit: no data, "
                               "no GPU")
    plan_gpus: int = opt(8, "--dry-run: plan for this many GPUs", low=1)
    plan_vocab: int = opt(32768, "--dry-run: the vocabulary to plan for when the tokenizer does not exist yet",
                          low=1, high=65536)
    tokens_per_file: int = opt(0, "--dry-run / shards-needed: tokens one downloaded FineWeb-Edu file gives "
                                  "(0 = FINEWEB_TOKENS_PER_FILE, an estimate)", low=0)


GPU_VOCAB_SIZE = 32768  # the GPU presets' tokenizer (run.sh's VOCAB=65536 for a larger one)


def _gpu_preset(name, depth, batch_size, tokens_per_param=20):
    """A GPU preset: width follows depth (n_embd = 64 x depth, 128-wide heads), ~0.5M tokens per step, and
    as many steps as make ~20 training tokens per parameter (the "Chinchilla" ratio), counting every
    parameter of the model at the 32K vocabulary: embedding and head (2 x vocab x width) plus 12 x width^2
    per block. Everything it reads and writes lives under out/<name>/, so presets never skip, resume or
    overwrite each other's work (run.sh makes the tokenizer and the shards there)."""
    width = 64 * depth
    params = 2 * GPU_VOCAB_SIZE * width + 12 * depth * width ** 2
    num_steps = round(tokens_per_param * params / 524288 / 100) * 100
    root = os.path.join("out", name)
    return dict(depth=depth, n_embd=64 * depth, n_head=depth // 2, n_kv_head=depth // 2, seq_len=2048, pointer_dim=0,
                value_embeds=0, batch_size=batch_size, total_batch_tokens=524288, num_steps=num_steps, matrix_lr=0.02,
                embed_lr=0.2 * (64 * depth / 768) ** -0.5, head_lr=0.004 * (64 * depth / 768) ** -0.5,
                warmup_steps=0, warmdown_frac=0.2, eval_every=250, eval_tokens=10 * 524288, sample_every=1000,
                save_every=500, shards=os.path.join(root, "shards", "fineweb"),
                tokenizer=os.path.join(root, "tokenizer", "tokenizer.json"), out_dir=os.path.join(root, "base"))


PRESETS = {
    "tiny": {},
    # d12 ~ GPT-2 small (124M at GPT-2's vocabulary; 110M here) on 1 GPU or a node; d20 and d26 on a node
    "d12": _gpu_preset("d12", 12, 32),
    "d20": _gpu_preset("d20", 20, 16),
    "d26": _gpu_preset("d26", 26, 8),
    # The d12 flow (FineWeb-Edu layout, its own tokenizer, a held-out val file, checkpoints, resume) at a size
    # 2 CPU processes finish in a minute: what CI runs against a local stand-in for the Hub (run.sh rehearsal).
    "rehearsal": {**_gpu_preset("rehearsal", 2, 4), "n_embd": 64, "n_head": 2, "n_kv_head": 2, "seq_len": 256,
                  "num_steps": 40, "total_batch_tokens": 4096, "matrix_lr": 0.04, "embed_lr": 0.3, "head_lr": 0.008,
                  "eval_every": 10, "eval_tokens": 4096, "sample_every": 20, "sample_tokens": 24, "save_every": 10},
}

# The lecture's reference run, printed beside ours
GPT2_FACTS = ("GPT-2 (2019): 1.6B parameters, 1024-token context, ~100B training tokens; reproduced by llm.c "
              "in about a day for about $600 on 8xH100 (vs ~$40k in 2019)")


def shard_set(cfg):
    """--shards: a folder holding a shard set (out/d12/shards/fineweb) or the NAME of one under out/shards/."""
    if os.sep in cfg.shards or os.path.isdir(cfg.shards):
        return cfg.shards
    return os.path.join(data.SHARDS_DIR, cfg.shards)


def data_paths(cfg):
    """-> {"tokenizer", "train", "val"}: the tokenizer file and the two shard globs this config trains on,
    without creating anything (every process of a multi-node job resolves its own, on its own disk)."""
    if cfg.shards:
        folder = shard_set(cfg)
        name = os.path.basename(os.path.normpath(folder))
        return {"tokenizer": cfg.tokenizer or data.TOKENIZER_PATH,
                **{s: os.path.join(folder, f"{name}_{s}_*.bin") for s in ("train", "val")}}
    if not cfg.input:
        return {"tokenizer": cfg.tokenizer or data.TOKENIZER_PATH,
                **{s: data.shard_pattern("embedded", s) for s in data.EMBEDDED_SPLITS}}
    shards_dir = os.path.join(cfg.out_dir, "shards")
    return {"tokenizer": cfg.tokenizer or data.TOKENIZER_PATH,
            **{s: data.shard_pattern("input", s, shards_dir) for s in ("train", "val")}}


def prepare_data(cfg):
    """Make what data_paths names, where data.py can: the embedded corpus by default (tokenizer trained and
    shards written on first use), or any text files given by --input, tokenized afresh with the default
    (or --tokenizer) tokenizer. A --shards set is made beforehand by `python data.py tokenize`, and is only
    checked: complete (its meta.json is written last) and made by this tokenizer."""
    paths = data_paths(cfg)
    if cfg.shards:
        data.check_shard_set(shard_set(cfg), paths["tokenizer"])
    elif not cfg.input:
        data.prepare_default()
    else:
        if not cfg.tokenizer:
            data.prepare_tokenizer()
        train_docs = [d["text"] for d in data.read_documents(data.expand_inputs(cfg.input)) if "text" in d]
        if cfg.val_input:
            val_docs = [d["text"] for d in data.read_documents(data.expand_inputs(cfg.val_input)) if "text" in d]
        else:  # hold out the last 10% of every document (nanoGPT's split of its Shakespeare file)
            cuts = [int(len(t) * 0.9) for t in train_docs]
            val_docs = [t[c:] for t, c in zip(train_docs, cuts)]
            train_docs = [t[:c] for t, c in zip(train_docs, cuts)]
        data.tokenize_to_shards({"train": train_docs, "val": val_docs}, "input", paths["tokenizer"],
                                os.path.join(cfg.out_dir, "shards"))
    return paths


def node_name(rt):
    return f"node {socket.gethostname()} (rank {rt.rank})"


def on_every_process(check, rt):
    """Run check() in every process; if it fails in any, fail in all with that process's message, naming its
    node. (A process that stopped alone would leave the others waiting forever at their next all-reduce.)"""
    try:
        result, problem = check(), None
    except (UserError, data.DataError) as e:  # alone, the process is the node: no name needed
        result, problem = None, f"{node_name(rt)}: {e}" if rt.world > 1 else str(e)
    problems = [problem]
    if rt.world > 1:
        problems = [None] * rt.world
        dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p), None)
    if first:
        raise UserError(first)
    return result


def local_rank():
    return int(os.environ.get("LOCAL_RANK", 0))


def open_data(cfg, rt):
    """What a multi-node job needs on every node, checked before anything is computed. The first process of
    each node prepares the embedded corpus on its own disk (the same files everywhere: same checkout, same
    seedless tokenizer training); --input shards go to out_dir, so rank 0 alone writes them; the others
    wait. Then every process checks its own tokenizer and shards, and all must hold the same tokenizer.
    -> (tokenizer, train shard pattern, val shard pattern)."""
    if (rt.rank if cfg.input else local_rank()) == 0:
        paths = on_every_process(lambda: prepare_data(cfg), rt)
    else:
        on_every_process(lambda: None, rt)
    paths = on_every_process(lambda: data_paths(cfg), rt)

    def check_files():
        for split in ("train", "val"):
            if not glob.glob(paths[split]):
                raise UserError(f"no {split} shards match {os.path.abspath(paths[split])}")
        try:
            return Tokenizer.load(paths["tokenizer"])
        except ValueError as e:  # missing or corrupt; the message names the file
            raise UserError(str(e)) from None
    tokenizer = on_every_process(check_files, rt)
    hashes = [tokenizer.hash()]
    if rt.world > 1:
        hashes = [None] * rt.world
        dist.all_gather_object(hashes, tokenizer.hash())
    if len(set(hashes)) > 1:
        raise UserError(f"the processes hold different tokenizers ({', '.join(sorted(set(hashes)))}): every node "
                        f"needs the same {paths['tokenizer']} and shards")
    return tokenizer, paths["train"], paths["val"]


def check_shared_out_dir(out_dir, rt):
    """Checkpoints are written by rank 0, and on --resume every process reads them: with several nodes the
    out_dir must be one folder they all see (a shared filesystem). Rank 0 leaves a marker there and every
    process looks for it, so a node-local out_dir fails now, not at the first resume."""
    if rt.world == 1 or int(os.environ.get("LOCAL_WORLD_SIZE", rt.world)) == rt.world:
        return  # one machine: one disk
    marker = [os.path.join(out_dir, f".shared-{uuid.uuid4().hex}") if rt.master else None]
    if rt.master:
        os.makedirs(out_dir, exist_ok=True)
        open(marker[0], "w").close()
    dist.broadcast_object_list(marker, src=0)
    try:
        def look():
            if not os.path.exists(marker[0]):
                raise UserError(f"--out-dir {os.path.abspath(out_dir)} is not the folder rank 0 writes to: with "
                                "several nodes it must be on a filesystem every node shares")
        on_every_process(look, rt)
    finally:
        dist.barrier()
        if rt.master:
            os.unlink(marker[0])


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


# Dense bf16 peak per GPU, from NVIDIA's data sheets (their headline figures with sparsity are twice these),
# keyed by the exact name torch.cuda.get_device_name() reports. Cards of one family differ a lot (an H100
# PCIe has 76% of an SXM's peak), so a name that is not listed is "unknown", never a neighbour's figure.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # H200 SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10G": 125e12,  # AWS's A10
    "NVIDIA L40S": 362e12,
}


def peak_flops(device):
    """The GPU's advertised bf16 peak, for MFU (model FLOPs utilisation); None where unknown (CPUs, GPUs
    not in PEAK_FLOPS: the log then shows mfu "-")."""
    if device.type != "cuda":
        return None
    return PEAK_FLOPS.get(torch.cuda.get_device_name(device))


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
          f"x {accum} accumulation step(s); device {rt.where}, "
          f"{'bf16 autocast' if rt.autocast_dtype else 'float32'}")
    print(f"for scale: {GPT2_FACTS}; its batch was ~1M tokens/step (ours {cfg.total_batch_tokens:,})")


# Flags a resumed pretraining run may change: where the files are (they may differ from node to node), what is
# watched, and where it runs. Every other flag decides what the run computes and must be the checkpoint's.
RESUME_FREE_FLAGS = ("shards", "input", "val_input", "tokenizer", "out_dir", "eval_every", "eval_tokens",
                     "sample_every", "sample_tokens", "save_every", "device", "dtype", "compile", "resume", "dry_run",
                     "plan_gpus", "plan_vocab", "tokens_per_file")


def flag_values(config, names):
    return ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in ((k, config[k]) for k in names))


def check_resume(path, model, cfg, rt, stage="base", free_flags=RESUME_FREE_FLAGS):
    """-> (the checkpoint's model, its meta) if this run can continue from it. Refuses, in one line each: no
    checkpoint, another stage's checkpoint, a model of another shape than this run's, a run whose flags (all
    but `free_flags`) differ from the checkpoint's -- a continuation with another learning rate or seed
    would be another run, not the same one finished -- and another number of processes."""
    path = checkpoint_file(path)
    if not os.path.exists(path):
        raise UserError(f"cannot --resume: no checkpoint at {path} (start without --resume)")
    loaded, _, meta = load_checkpoint(path, device=rt.device)
    if meta.get("stage") != stage:
        raise UserError(f"cannot --resume from {path}: it is a {meta.get('stage')!r} checkpoint, this run trains "
                        f"{stage!r} (another stage's --out-dir?)")
    if loaded.config != model.config:
        theirs, ours = dataclasses.asdict(loaded.config), dataclasses.asdict(model.config)
        differ = [k for k in ours if theirs[k] != ours[k]]
        raise UserError(f"cannot --resume from {path}: it holds a model with "
                        f"{', '.join(f'{k} {theirs[k]}' for k in differ)}, but this run asks for "
                        f"{', '.join(f'{k} {ours[k]}' for k in differ)} (another preset's checkpoint? use its "
                        "--out-dir, or delete it)")
    ours = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    theirs = {k: list(v) if isinstance(v, tuple) else v for k, v in meta["config"].items()}
    differ = [k for k in ours if k in theirs and k not in free_flags and theirs[k] != ours[k]]
    if differ:
        raise UserError(f"cannot --resume from {path}: it was trained with {flag_values(theirs, differ)}, this run "
                        f"asks for {flag_values(ours, differ)} (resume with the flags it was started with)")
    if not meta["loaders"] or len(meta["loaders"]) != rt.world:
        raise UserError(f"cannot resume from {path}: it was saved by "
                        f"{len(meta['loaders'] or [])} process(es), this run has {rt.world}")
    return loaded, meta


def restore(path, model, optimizers, loader, cfg, rt, stage="base", free_flags=RESUME_FREE_FLAGS):
    """Resume: load weights, optimizer and loader states and RNG from a checkpoint (checked by check_resume)
    -> its meta: meta["step"] is the step to continue from, and the stage's own saved state is there too."""
    loaded, meta = check_resume(path, model, cfg, rt, stage, free_flags)
    model.load_state_dict(loaded.state_dict())
    for opt_, state in zip(optimizers, meta["optimizers"]):
        opt_.load_state_dict(state)
        if isinstance(opt_, Muon):
            opt_.drop_foreign_state()
    loader.load_state_dict(meta["loaders"][rt.rank])
    torch.set_rng_state(meta["rng"]["cpu"].cpu())
    if meta["rng"]["cuda"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in meta["rng"]["cuda"]])
    return meta


def resume_if_asked(cfg, rt, model, optimizers, loader, stage="base", free_flags=RESUME_FREE_FLAGS):
    """The start of every stage's training loop: -> the checkpoint's meta on --resume (every process reads
    cfg.out_dir/model.pt, so with several nodes the folder must be shared: checked first), else None."""
    check_shared_out_dir(cfg.out_dir, rt)
    if not cfg.resume:
        return None
    path = os.path.join(cfg.out_dir, "model.pt")
    meta = on_every_process(lambda: restore(path, model, optimizers, loader, cfg, rt, stage, free_flags), rt)
    if rt.master:
        print(f"resuming from {path} at step {meta['step']}")
    return meta


def save_training_state(path, model, tokenizer, step, cfg, optimizers, loader, rt, metrics=None, stage="base",
                        extra=None):
    """A resumable checkpoint, written by rank 0; every process calls it (the loader positions and Muon's
    momenta are spread over the processes and gathered first)."""
    states = gather_loader_states(loader, rt)
    muons = [o for o in optimizers if isinstance(o, Muon)]
    for muon in muons:
        muon.gather_state()
    if rt.master:
        save_checkpoint(path, model, tokenizer, step, cfg, metrics, optimizers, states, stage, extra)
    for muon in muons:
        muon.drop_foreign_state()


def gather_loader_states(loader, rt):
    """Every process reads its own slice of the data; a resumable checkpoint needs all their positions."""
    if rt.world == 1:
        return [loader.state_dict()]
    states = [None] * rt.world
    dist.all_gather_object(states, loader.state_dict())
    return states


def remove_stale_temp_files(folder):
    """A kill during a checkpoint write leaves its temp file (never the checkpoint itself: see
    _atomic_torch_save); the next start of the stage removes such leftovers."""
    for tmp in glob.glob(os.path.join(folder, ".tmp-*.pt")):
        os.unlink(tmp)


def truncate_log(path, step, training_key="loss"):
    """On --resume from a checkpoint at `step`: drop the log rows the killed run wrote after it (training
    steps past `step`, and evaluations at or past it, which the resumed run repeats), so that every step
    appears once. Training rows are those holding `training_key`."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in rows if r["step"] < step or (r["step"] == step and training_key in r)]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)


class StageLog:
    """A stage's log.jsonl: one JSON row per training step and per evaluation, written by rank 0 (the other
    processes' record() does nothing). Opening it tidies up after a kill: temp files of an interrupted
    checkpoint write are removed, and on a resume from step N (resume_step) the rows the killed run wrote
    after N are dropped before appending. `started`: a time.time() to add each row's "elapsed" seconds."""

    def __init__(self, out_dir, rt, resume_step=None, started=None, training_key="loss", name="log.jsonl"):
        self.started, self.file = started, None
        if rt.master:
            os.makedirs(out_dir, exist_ok=True)
            remove_stale_temp_files(out_dir)
            path = os.path.join(out_dir, name)
            if resume_step is not None:
                truncate_log(path, resume_step, training_key)
            self.file = open(path, "w" if resume_step is None else "a")

    def record(self, row):
        if self.file:
            if self.started is not None:
                row = {**row, "elapsed": time.time() - self.started}
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


def build_model(cfg, vocab_size):
    """A freshly initialised GPT of the shape cfg asks for."""
    if cfg.n_embd % cfg.n_head or cfg.n_head % cfg.n_kv_head or (cfg.n_embd // cfg.n_head) % 2:
        raise UserError(f"n_embd {cfg.n_embd} must split into n_head {cfg.n_head} heads of even size, and n_head "
                        f"into n_kv_head {cfg.n_kv_head} groups")
    return GPT(gpt_config(cfg, vocab_size))


def gpt_config(cfg, vocab_size):
    """The network's shape (GPTConfig) that a run's knobs (TrainConfig) ask for, at this vocabulary."""
    return GPTConfig(vocab_size=vocab_size, seq_len=cfg.seq_len, n_layer=cfg.depth, n_embd=cfg.n_embd,
                     n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, pointer_dim=cfg.pointer_dim,
                     value_embeds=cfg.value_embeds)


def wrap_for_training(model, cfg, rt):
    """-> (the module the loop calls, the DDP wrapper or None). Under torchrun, DistributedDataParallel
    averages the gradients across processes *during* the backward pass: it groups them in buckets and sends
    each bucket as soon as its gradients are ready, so the network overlaps the remaining backward work.
    torch.compile then goes around it (compiling a DDP module splits the graph at the buckets on purpose, so
    the overlap survives compilation)."""
    ddp = None
    if rt.world > 1:
        ddp = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                  forward_sync_buffers=False,  # the rotary tables come from the config: equal everywhere
                  gradient_as_bucket_view=True)  # gradients live in the buckets: no second copy
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and rt.device.type == "cuda")
    wrapped = ddp or model
    return (torch.compile(wrapped) if use_compile else wrapped), ddp


def train_step(model, train_model, ddp, optimizers, loader, accum, lr_mult, cfg, rt):
    """One optimizer step on total_batch_tokens tokens -> (mean loss, gradient norm) before the update.
    The batch is processed in `accum` micro-batches per process (what fits in memory); their gradients add
    up, and DDP averages them over the processes during the last micro-batch's backward pass (no_sync skips
    the exchange before that), so the step is the same as one on the whole batch at once.
    The update is skipped if the loss is not finite: the caller stops the run."""
    for opt_ in optimizers:
        for group in opt_.param_groups:
            group["lr"] = group["base_lr"] * lr_mult
    loss = torch.zeros((), device=rt.device)
    for micro in range(accum):
        x, y = loader.next_batch()
        sync = ddp is None or micro == accum - 1
        with contextlib.nullcontext() if sync else ddp.no_sync():
            with rt.autocast():
                _, micro_loss = train_model(x.to(rt.device), y.to(rt.device))
            (micro_loss / accum).backward()  # gradients add up over micro-steps: divide to get the mean
        loss += micro_loss.detach() / accum
    all_reduce_mean([loss], rt)
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
    table = os.path.join(root, "evals", "table.md")  # evals.py's stage x task table (it writes it after each exam)
    if os.path.exists(table):
        with open(table) as f:
            lines += ["## evals: the standard exams (evals.py)", "", f.read().rstrip(), ""]
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
    # Both splits must hold at least one step of every process *before* step 0: a val split too small for
    # one evaluation would otherwise stop the run at its first evaluation, hours in.
    loader = on_every_process(lambda: RandomWindows(train_pattern, cfg.batch_size, cfg.seq_len, rt.rank, rt.world,
                                                    cfg.seed), rt)
    on_every_process(lambda: data.DataLoader(val_pattern, cfg.batch_size, cfg.seq_len, rt.rank, rt.world), rt)
    model = build_model(cfg, tokenizer.vocab_size).to(rt.device)
    optimizers = build_optimizers(model, cfg, rt.device.type, rt.rank, rt.world)
    ckpt_path = os.path.join(cfg.out_dir, "model.pt")
    if rt.master:
        print_plan(cfg, model, accum, rt, loader.stream.total)
    resumed = resume_if_asked(cfg, rt, model, optimizers, loader)
    step = resumed["step"] if resumed else 0
    train_model, ddp = wrap_for_training(model, cfg, rt)
    token_bytes = token_byte_counts(tokenizer)
    flops_per_step, peak = model.flops_per_token() * cfg.total_batch_tokens, peak_flops(rt.device)
    run_log = StageLog(cfg.out_dir, rt, step if resumed else None, started)
    record = run_log.record

    def save(metrics=None):
        save_training_state(ckpt_path, model, tokenizer, step, cfg, optimizers, loader, rt, metrics)

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
        loss_value, grad_norm = train_step(model, train_model, ddp, optimizers, loader, accum, mult, cfg, rt)
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
                   peak_memory_gib=torch.cuda.max_memory_allocated(rt.device) / 2 ** 30 if rt.device.type == "cuda"
                   else None, wall_seconds=time.time() - started)
    if rt.master:  # what the document simulator writes now, for the report card
        metrics["sample"] = tokenizer.decode(list(model.generate([bos], cfg.sample_tokens, temperature=0.8, top_k=50,
                                                                 seed=cfg.seed)))
    record(dict(step=step, val_loss=res["loss"], val_bpb=res["bpb"], final=True))
    save(metrics)
    run_log.close()
    if rt.master:
        write_results(cfg, metrics, losses)
    return metrics


# ----------------------------------------------------------------------------------------------------
# The plan before the run: `python train_gpt.py --preset d20 --dry-run` (nothing is read, nothing is
# allocated: the model is built on PyTorch's "meta" device, which has shapes but no memory)

# Tokens one FineWeb-Edu sample/10BT parquet file gives (the sample is ~10B GPT-2 tokens in 14 files). Our
# 32K tokenizer cuts English a little finer than GPT-2's 50K one; run.sh measures the real figure from the
# first downloaded file (bytes of text / bytes per token) and passes it as --tokens-per-file.
FINEWEB_TOKENS_PER_FILE = 750_000_000
FINEWEB_FILES = 14  # in sample/10BT; run.sh keeps the first as the validation file
GIB = 2 ** 30
# Bytes that autograd keeps per token per block for the backward pass, in units of n_embd (the weights it
# also keeps are counted apart): counted with torch.autograd.graph.saved_tensors_hooks on this model
# (test_all.py repeats the count): 76 in float32 -- the inputs of every matmul, the norms, rotary, the
# attention output and its log-sum-exp, the MLP's 4x-wide hidden state twice -- and 50 under bf16 autocast,
# where the matmul inputs are stored in 2 bytes.
SAVED_BYTES_PER_TOKEN_LAYER = {"float32": 76, "bfloat16": 50}
GPU_OVERHEAD_GIB = 3.0  # CUDA context, cuBLAS/compile workspaces, allocator fragmentation (a round guess)
PLAN_GPUS = {"H100 SXM": 989e12, "H200": 989e12}  # dense bf16 peaks (see PEAK_FLOPS)
PLAN_MFU = 0.40


def memory_plan(cfg, config, world, dtype="bfloat16"):
    """Estimated bytes per process at cfg's micro-batch: {part: bytes} for weights, gradients, optimizer
    state, bf16 weight copies, saved activations and the loss chunk's logits."""
    with torch.device("meta"):
        model = GPT(config)
    params = model.num_params()
    matrices = sum(p.numel() for p in model.blocks.parameters())
    adam_params = params - matrices
    tokens = cfg.batch_size * cfg.seq_len
    two_byte = dtype == "bfloat16"
    chunk = min(tokens, LOSS_CHUNK_TOKENS)
    return {
        "weights (fp32)": 4 * params,
        "gradients (fp32)": 4 * params,
        "AdamW moments (embedding, head)": 8 * adam_params,
        "Muon momentum (this rank's share)": 4 * matrices / world,
        "bf16 copies of the weights": 2 * (params - model.wte.weight.numel()) if two_byte else 0,
        "saved activations": SAVED_BYTES_PER_TOKEN_LAYER[dtype] * config.n_embd * config.n_layer * tokens,
        # one chunk's logits (fp32, plus their bf16 matmul output) and their gradient, 3 x 4 + 2 bytes each
        "loss chunk logits": (14 if two_byte else 12) * chunk * config.vocab_size,
    }


def dry_run(cfg):
    """Print the plan of cfg's run on cfg.plan_gpus GPUs, touching no data and no GPU."""
    vocab = Tokenizer.load(cfg.tokenizer).vocab_size if cfg.tokenizer and os.path.exists(cfg.tokenizer) \
        else cfg.plan_vocab
    config = gpt_config(cfg, vocab)
    with torch.device("meta"):
        model = GPT(config)
    world, n = cfg.plan_gpus, model.num_params()
    micro = cfg.batch_size * cfg.seq_len
    tokens = cfg.total_batch_tokens * cfg.num_steps
    per_file = cfg.tokens_per_file or FINEWEB_TOKENS_PER_FILE
    files = shards_needed(tokens, per_file)
    parts = memory_plan(cfg, config, world)
    total = sum(parts.values()) + GPU_OVERHEAD_GIB * GIB
    print(f"plan (an estimate: nothing measured) for {cfg.depth} layers x {cfg.n_embd} wide, vocab {vocab:,}, "
          f"context {cfg.seq_len}, on {world} GPU(s)")
    rows = [("parameters", f"{n:,} ({n - model.wte.weight.numel():,} outside the embedding)"),
            ("tokens per step", f"{cfg.total_batch_tokens:,} = {world} GPUs x {cfg.batch_size} x {cfg.seq_len} x "
                                f"{cfg.total_batch_tokens / (world * micro):g} micro-batches per GPU"),
            ("tokens to train", f"{tokens:,} ({cfg.num_steps:,} steps; {tokens / n:.1f} per parameter)"),
            ("FineWeb-Edu files", f"{files} for training + 1 held out for validation, at {per_file:,} tokens per file"
                                  f"{'' if cfg.tokens_per_file else ' (estimated)'}")]
    if cfg.total_batch_tokens % (world * micro):
        rows.append(("WARNING", f"{cfg.total_batch_tokens:,} tokens per step do not split into {world} x {micro:,}"))
    if files > FINEWEB_FILES - 1:
        rows.append(("WARNING", f"the sample has {FINEWEB_FILES - 1} training files: the data would be seen "
                                f"{tokens / ((FINEWEB_FILES - 1) * per_file):.1f} times"))
    rows += [(f"memory: {part}", f"{size / GIB:.2f} GiB") for part, size in parts.items()]
    rows.append(("memory per GPU", f"{total / GIB:.1f} GiB with {GPU_OVERHEAD_GIB:g} GiB of CUDA overhead "
                                   f"({'fits' if total < 80e9 else 'does NOT fit'} an 80 GB GPU)"))
    for gpu, peak in PLAN_GPUS.items():
        seconds = model.flops_per_token() * tokens / (PLAN_MFU * peak * world)
        rows.append((f"time on {world} x {gpu}", f"{fmt_time(seconds)} at {PLAN_MFU:.0%} MFU "
                                                  f"({seconds * world / 3600:.1f} GPU-hours)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print("  (post-training's memory at this size: python rlhf.py plan, with the same flags)")
    return dict(params=n, tokens=tokens, files=files, memory_bytes=total, parts=parts, vocab_size=vocab)


def shards_needed(tokens, tokens_per_file):
    """How many FineWeb-Edu files hold `tokens` training tokens (at least one)."""
    return max(1, math.ceil(tokens / tokens_per_file))


def shards_needed_main(argv):
    """`python train_gpt.py shards-needed --preset d12 --tokens-per-file N`: print how many FineWeb-Edu
    files the preset's planned tokens need (run.sh downloads that many, plus one for validation)."""
    cfg = parse_config(TrainConfig, argv, PRESETS, prog="train_gpt.py shards-needed")
    tokens, per_file = cfg.total_batch_tokens * cfg.num_steps, cfg.tokens_per_file or FINEWEB_TOKENS_PER_FILE
    needed, available = shards_needed(tokens, per_file), FINEWEB_FILES - 1
    if needed > available:
        print(f"note: the plan needs {needed} FineWeb-Edu files but the sample has {available} besides the "
              f"validation file: training will see its data {tokens / (available * per_file):.1f} times",
              file=sys.stderr)
    print(min(needed, available))


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
    x, y = torch.tensor([ids[:-1]]), torch.tensor([[-1] * (len(ids) - 2) + [ids[-1]]])  # scored: the last only
    target = ids[-1]

    def next_probs():
        with torch.no_grad():
            return model(x)[0][0, -1].softmax(-1)

    before = next_probs()
    model.zero_grad()
    model(x, y)[1].backward()  # -log p(the true last token): the step makes exactly that likelier
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
    commands = {"eval": eval_main, "demo": demo_main, "report": report_main, "shards-needed": shards_needed_main}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    cfg = parse_config(TrainConfig, argv, PRESETS, prog="train_gpt.py",
                       description=__doc__ + "\nsubcommands: eval (--help), demo (--help), report [DIR], "
                                                     "shards-needed (--help)")
    if cfg.dry_run:
        return dry_run(cfg)
    with distributed_stage():
        train(cfg)


if __name__ == "__main__":
    run_cli(main)
