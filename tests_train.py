"""Tests for train_gpt.py (to be folded into test_all.py). Fast unless marked slow."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train_gpt as tg

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable


def small_model(seed=0, **over):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, seq_len=32, n_layer=2, n_embd=32, n_head=4, n_kv_head=2)
    cfg.update(over)
    model = tg.GPT(tg.GPTConfig(**cfg))
    # zero-initialised output projections make every block the identity at step 0; randomise them so the
    # tests exercise attention and the MLP, not a shortcut
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_logits_shape_and_probabilities_sum_to_one():
    model = small_model()
    logits, loss = model(torch.randint(0, 97, (3, 11)))
    assert logits.shape == (3, 11, 97) and loss is None
    assert torch.allclose(logits.softmax(-1).sum(-1), torch.ones(3, 11), atol=1e-5)
    assert logits.abs().max() < model.config.softcap  # soft-capped


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_kv_cache_decoding_matches_full_forward(n_kv_head):
    model = small_model(n_kv_head=n_kv_head).eval()
    idx = torch.randint(0, 97, (2, 20))
    full, _ = model(idx)
    cache = tg.KVCache(model.config, 2, "cpu")
    pieces = [model(idx[:, :7], kv_cache=cache)[0]]  # a prompt, then a chunk of 3, then one at a time
    pieces.append(model(idx[:, 7:10], kv_cache=cache)[0])
    pieces += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(10, 20)]
    assert cache.pos == 20
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_causality_future_tokens_never_change_past_logits():
    model = small_model().eval()
    idx = torch.randint(0, 97, (1, 16))
    changed = idx.clone()
    changed[0, 9:] = (changed[0, 9:] + 1) % 97
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.equal(a[0, :9], b[0, :9])
    assert not torch.allclose(a[0, 9:], b[0, 9:])


def test_context_window_is_enforced():
    model = small_model()
    with pytest.raises(ValueError, match="context window"):
        model(torch.zeros(1, 33, dtype=torch.long))


def train_cfg(**over):
    return tg.TrainConfig(**{**dict(matrix_lr=0.05, embed_lr=0.05, head_lr=0.02, warmup_steps=0,
                                    warmdown_frac=0.0), **over})


def test_one_step_raises_probability_of_the_true_next_token():
    model = small_model()
    x, y = torch.randint(0, 97, (1, 8)), torch.randint(0, 97, (1, 8))
    p_before = model(x)[0].softmax(-1)[0, -1, y[0, -1]]
    optimizers = tg.build_optimizers(model, train_cfg(), "cpu")
    model(x, y)[1].backward()
    for o in optimizers:
        o.step()
    assert model(x)[0].softmax(-1)[0, -1, y[0, -1]] > p_before


def test_a_few_steps_overfit_a_tiny_batch():
    model = small_model()
    model.init_weights()  # the real initialisation, zero output projections included
    optimizers = tg.build_optimizers(model, train_cfg(), "cpu")
    x = torch.randint(0, 97, (4, 32))
    y = torch.roll(x, -1, dims=1)
    first = None
    for _ in range(60):
        _, loss = model(x, y)
        first = first if first is not None else loss.item()
        loss.backward()
        for o in optimizers:
            o.step()
        model.zero_grad()
    assert first > 4.4 and loss.item() < 0.5  # from ~ln(97) = 4.57 to memorised


def test_orthogonalize_flattens_singular_values():
    for shape in [(16, 48), (48, 16)]:
        g = torch.randn(shape) @ torch.diag(torch.logspace(0, 2, shape[1]))[: shape[1], : shape[1]]
        s = torch.linalg.svdvals(tg.orthogonalize(g))
        assert s.min() > 0.5 and s.max() < 1.3, s  # from a 100x spread to roughly 1


def test_lr_schedule_warmup_constant_warmdown():
    f = [tg.lr_multiplier(s, 100, 10, 0.4, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in f[10:60])
    assert all(a > b for a, b in zip(f[60:], f[61:])) and f[-1] > 0.1 - 1e-9


def test_generation_is_reproducible_by_seed_and_greedy_is_deterministic():
    model = small_model().eval()
    gen = lambda **k: list(model.generate([1, 2, 3], 25, **k))
    assert gen(seed=5) == gen(seed=5)
    assert gen(seed=5) != gen(seed=6)
    assert gen(temperature=0) == gen(temperature=0, seed=9)
    assert len(gen(seed=1, top_k=5, top_p=0.9)) == 25


def test_generation_past_the_context_window_keeps_going():
    model = small_model().eval()
    assert len(list(model.generate(list(range(30)), 50, seed=0))) == 50  # window of 32, cropped as it fills


def test_generation_matches_naive_full_recompute_when_greedy():
    model = small_model().eval()
    tokens = [5, 6, 7]
    for _ in range(12):
        tokens.append(model(torch.tensor([tokens]))[0][0, -1].argmax().item())
    assert list(model.generate([5, 6, 7], 12, temperature=0)) == tokens[3:]


def test_generation_stops_at_stop_tokens():
    model = small_model().eval()
    free = list(model.generate([1, 2], 30, seed=3))
    stop = free[10]
    out = list(model.generate([1, 2], 30, seed=3, stop_tokens={stop}))
    assert out == free[: free.index(stop) + 1] and out[-1] == stop


def test_top_k_and_top_p_cut_the_tail():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    assert {tg.sample_next(logits, top_k=2, generator=g).item() for _ in range(200)} == {0, 1}
    assert {tg.sample_next(logits, top_p=0.75, generator=g).item() for _ in range(200)} == {0, 1}
    assert tg.sample_next(logits, temperature=0).item() == 0


def test_autocast_code_path_runs_in_bfloat16_on_cpu():
    rt = tg.Runtime(torch.device("cpu"), torch.bfloat16)
    model = small_model()
    with rt.autocast():
        logits, loss = model(torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8)))
        assert torch.is_autocast_enabled("cpu")
    assert logits.dtype == torch.float32 and torch.isfinite(loss)  # logits are upcast before the softmax
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_flops_per_token_counts_matmul_weights():
    model = small_model()
    c = model.config
    dense = model.num_params() - c.vocab_size * c.n_embd
    assert model.flops_per_token() == 6 * dense + 12 * c.n_layer * c.n_embd * c.seq_len


def test_cli_flags_come_from_the_dataclass_and_presets_apply():
    cfg = tg.parse_config(tg.TrainConfig, ["--preset", "d12", "--num-steps", "7", "--no-resume"], tg.PRESETS)
    assert cfg.depth == 12 and cfg.n_embd == 768 and cfg.num_steps == 7 and cfg.resume is False
    assert tg.parse_config(tg.TrainConfig, [], tg.PRESETS) == tg.TrainConfig()
    with pytest.raises(tg.UserError, match="unknown preset 'huge'"):
        tg.parse_config(tg.TrainConfig, ["--preset", "huge"], tg.PRESETS)
    with pytest.raises(tg.UserError, match="--num-steps"):
        tg.parse_config(tg.TrainConfig, ["--num-steps", "many"], tg.PRESETS)
