"""Tests for train_gpt.py (to be folded into test_all.py). Fast unless marked slow."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import train_gpt as tg
from tokenizer import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_gpt(seed=0, **over):
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
    model = tiny_gpt()
    logits, loss = model(torch.randint(0, 97, (3, 11)))
    assert logits.shape == (3, 11, 97) and loss is None
    assert torch.allclose(logits.softmax(-1).sum(-1), torch.ones(3, 11), atol=1e-5)
    assert logits.abs().max() < model.config.softcap  # soft-capped


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_kv_cache_decoding_matches_full_forward(n_kv_head):
    model = tiny_gpt(n_kv_head=n_kv_head).eval()
    idx = torch.randint(0, 97, (2, 20))
    full, _ = model(idx)
    cache = tg.KVCache(model.config, 2, "cpu")
    pieces = [model(idx[:, :7], kv_cache=cache)[0]]  # a prompt, then a chunk of 3, then one at a time
    pieces.append(model(idx[:, 7:10], kv_cache=cache)[0])
    pieces += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(10, 20)]
    assert cache.pos == 20
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_causality_future_tokens_never_change_past_logits():
    model = tiny_gpt().eval()
    idx = torch.randint(0, 97, (1, 16))
    changed = idx.clone()
    changed[0, 9:] = (changed[0, 9:] + 1) % 97
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.equal(a[0, :9], b[0, :9])
    assert not torch.allclose(a[0, 9:], b[0, 9:])


def test_context_window_is_enforced():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="context window"):
        model(torch.zeros(1, 33, dtype=torch.long))


def optim_cfg(**over):
    return tg.TrainConfig(**{**dict(matrix_lr=0.05, embed_lr=0.05, head_lr=0.02, warmup_steps=0,
                                    warmdown_frac=0.0), **over})


def test_one_step_raises_probability_of_the_true_next_token():
    model = tiny_gpt()
    x, y = torch.randint(0, 97, (1, 8)), torch.randint(0, 97, (1, 8))
    p_before = model(x)[0].softmax(-1)[0, -1, y[0, -1]]
    optimizers = tg.build_optimizers(model, optim_cfg(), "cpu")
    model(x, y)[1].backward()
    for o in optimizers:
        o.step()
    assert model(x)[0].softmax(-1)[0, -1, y[0, -1]] > p_before


def test_a_few_steps_overfit_a_tiny_batch():
    model = tiny_gpt()
    model.init_weights()  # the real initialisation, zero output projections included
    optimizers = tg.build_optimizers(model, optim_cfg(), "cpu")
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
    model = tiny_gpt().eval()
    gen = lambda **k: list(model.generate([1, 2, 3], 25, **k))
    assert gen(seed=5) == gen(seed=5)
    assert gen(seed=5) != gen(seed=6)
    assert gen(temperature=0) == gen(temperature=0, seed=9)
    assert len(gen(seed=1, top_k=5, top_p=0.9)) == 25


def test_generation_past_the_context_window_keeps_going():
    model = tiny_gpt().eval()
    assert len(list(model.generate(list(range(30)), 50, seed=0))) == 50  # window of 32, cropped as it fills


def test_generation_matches_naive_full_recompute_when_greedy():
    model = tiny_gpt().eval()
    tokens = [5, 6, 7]
    for _ in range(12):
        tokens.append(model(torch.tensor([tokens]))[0][0, -1].argmax().item())
    assert list(model.generate([5, 6, 7], 12, temperature=0)) == tokens[3:]


def test_generation_stops_at_stop_tokens():
    model = tiny_gpt().eval()
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
    model = tiny_gpt()
    with rt.autocast():
        logits, loss = model(torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8)))
        assert torch.is_autocast_enabled("cpu")
    assert logits.dtype == torch.float32 and torch.isfinite(loss)  # logits are upcast before the softmax
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_flops_per_token_counts_matmul_weights():
    model = tiny_gpt()
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


# ----------------------------------------------------------------------------------------------------
# Training runs on a small text (a slice of the embedded validation split) with a 300-token tokenizer

@pytest.fixture(scope="module")
def train_corpus(tmp_path_factory):
    """A text file and a small tokenizer trained on it: {"text": path, "tokenizer": path}."""
    folder = tmp_path_factory.mktemp("train_corpus")
    text_path, tok_path = folder / "text.txt", folder / "tokenizer.json"
    text_path.write_text(next(data.embedded_documents("val"))[:60000], encoding="utf-8")
    Tokenizer.train(str(text_path), 300).save(str(tok_path))
    return {"text": str(text_path), "tokenizer": str(tok_path)}


def train_run_cfg(train_corpus, out_dir, **over):
    base = dict(input=(train_corpus["text"],), tokenizer=train_corpus["tokenizer"], out_dir=str(out_dir), depth=2,
                n_embd=32, n_head=2, n_kv_head=1, seq_len=32, batch_size=4, total_batch_tokens=256, num_steps=8,
                warmup_steps=2, eval_every=4, eval_tokens=512, sample_every=4, sample_tokens=8, device="cpu")
    return tg.TrainConfig(**{**base, **over})


def train_log_losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f) if "loss" in row}


def test_random_windows_split_across_processes_exactly_and_resume(train_corpus, tmp_path):
    paths = tg.prepare_data(train_run_cfg(train_corpus, tmp_path))
    one = tg.RandomWindows(paths["train"], 6, 16, 0, 1, seed=3)
    ranks = [tg.RandomWindows(paths["train"], 3, 16, r, 2, seed=3) for r in (0, 1)]
    for _ in range(3):
        x, y = one.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    later = tg.RandomWindows(paths["train"], 6, 16, 0, 1, seed=3)
    later.load_state_dict(one.state_dict())
    assert torch.equal(later.next_batch()[0], one.next_batch()[0])
    starts = {tuple(one.next_batch()[0][:, 0].tolist()) for _ in range(3)}
    assert len(starts) == 3  # different windows every draw


def test_training_writes_checkpoint_metrics_log_and_curve(train_corpus, tmp_path, capsys):
    metrics = tg.train(train_run_cfg(train_corpus, tmp_path))
    out = capsys.readouterr().out
    assert "plan: 8 steps x 256 tokens/step = 2,048 tokens" in out and "GPT-2 (2019)" in out
    assert "passes over the" in out
    assert "step 8/8 | loss" in out and "| grad norm" in out and "| eta" in out
    assert "generating:" in out and "val bpb" in out
    with open(tmp_path / "metrics.json") as f:
        saved = json.load(f)
    assert {"val_bpb", "params", "tokens", "train_seconds"} <= set(saved) and saved["tokens"] == 2048
    assert 0 < saved["val_bpb"] < 10 and saved == pytest.approx(metrics)
    assert sorted(train_log_losses(tmp_path)) == list(range(1, 9))
    assert (tmp_path / "loss_curve.txt").read_text().count("*") >= 8
    model, tok, meta = tg.load_checkpoint(str(tmp_path))
    assert meta["step"] == 8 and meta["metrics"]["val_bpb"] == saved["val_bpb"]
    assert tok.hash() == Tokenizer.load(train_corpus["tokenizer"]).hash()
    assert len(list(model.generate([1], 5, seed=0))) == 5


def test_loss_goes_down(train_corpus, tmp_path):
    tg.train(train_run_cfg(train_corpus, tmp_path, num_steps=30, eval_every=0, sample_every=0, warmdown_frac=0.2))
    losses = train_log_losses(tmp_path)
    assert sum(losses[k] for k in range(26, 31)) < sum(losses[k] for k in range(1, 6)) - 5 * 0.5


def test_same_seed_same_losses_and_resume_after_a_kill_is_bit_identical(train_corpus, tmp_path, monkeypatch):
    cfg = dict(num_steps=8, save_every=2, eval_every=0, sample_every=0)
    tg.train(train_run_cfg(train_corpus, tmp_path / "straight", **cfg))
    tg.train(train_run_cfg(train_corpus, tmp_path / "again", **cfg))
    straight = train_log_losses(tmp_path / "straight")
    assert train_log_losses(tmp_path / "again") == straight

    # "Kill" the run inside step 6 (2 micro-batches per step: the loader fails on its 11th batch); the last
    # checkpoint is from step 4
    calls, real_next = [0], tg.RandomWindows.next_batch

    def dying_next(self):
        calls[0] += 1
        if calls[0] == 11:
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(tg.RandomWindows, "next_batch", dying_next)
    with pytest.raises(KeyboardInterrupt):
        tg.train(train_run_cfg(train_corpus, tmp_path / "killed", **cfg))
    monkeypatch.setattr(tg.RandomWindows, "next_batch", real_next)
    assert tg.load_checkpoint(str(tmp_path / "killed"))[2]["step"] == 4
    tg.train(train_run_cfg(train_corpus, tmp_path / "killed", resume=True, **cfg))
    resumed = train_log_losses(tmp_path / "killed")
    assert [resumed[k] for k in range(5, 9)] == [straight[k] for k in range(5, 9)]  # exact equality


def test_diverging_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(train_corpus, tmp_path):
    tg.train(train_run_cfg(train_corpus, tmp_path, num_steps=2, eval_every=0, sample_every=0))
    good = tg.load_checkpoint(str(tmp_path))[2]
    with pytest.raises(tg.UserError, match="diverged"):
        tg.train(train_run_cfg(train_corpus, tmp_path, embed_lr=1e20, matrix_lr=1e20, head_lr=1e20, num_steps=20,
                         eval_every=0, sample_every=0, warmup_steps=0))
    assert tg.load_checkpoint(str(tmp_path))[2]["step"] == good["step"] == 2


def run_train_main(argv, capsys):
    """Run the CLI in-process -> (exit code, stdout, stderr)."""
    try:
        tg.run_cli(tg.main, argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_train_error_line(result, *fragments):
    code, _, err = result
    assert code == 2, result
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_user_mistakes_end_with_one_line_and_exit_code_2(train_corpus, tmp_path, capsys):
    def check(argv, *fragments):
        assert_train_error_line(run_train_main(argv, capsys), *fragments)

    text, tok = train_corpus["text"], train_corpus["tokenizer"]
    check(["--preset", "huge"], "unknown preset 'huge'", "tiny, d12, d20, d26")
    check(["--depth", "four"], "--depth", "invalid int value")
    check(["--batch-size", "3", "--total-batch-tokens", "1000", "--input", text, "--tokenizer", tok,
           "--out-dir", str(tmp_path)], "--total-batch-tokens 1000 is not a multiple", "3 x 256 x 1 = 768")
    check(["eval", "--checkpoint", str(tmp_path / "nowhere"), "--text", text], "no checkpoint at")
    check(["--input", str(tmp_path / "missing.txt")], "missing.txt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    check(["eval", "--checkpoint", str(tmp_path / "junk.pt"), "--text", text], "not a readable scratchgpt checkpoint")


def test_mismatched_tokenizer_or_config_is_refused(train_corpus, tmp_path, capsys):
    tg.train(train_run_cfg(train_corpus, tmp_path, num_steps=2, eval_every=0, sample_every=0))
    other = Tokenizer.train(train_corpus["text"], 280)
    with pytest.raises(tg.UserError, match="trained with tokenizer .*vocab 280 vs model's 300"):
        tg.load_checkpoint(str(tmp_path), tokenizer=other)
    with pytest.raises(tg.UserError, match="cannot resume"):
        tg.train(train_run_cfg(train_corpus, tmp_path, n_embd=64, resume=True))
    # a checkpoint whose stored tokenizer disagrees with its model's vocab
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    state["model_config"]["vocab_size"] = 299
    torch.save(state, tmp_path / "bad.pt")
    argv = ["eval", "--checkpoint", str(tmp_path / "bad.pt"), "--text", train_corpus["text"]]
    assert_train_error_line(run_train_main(argv, capsys), "tokenizer vocab 300 differs from the model's 299")


def test_eval_command_prints_bits_per_byte_of_a_text_file(train_corpus, tmp_path, capsys):
    tg.train(train_run_cfg(train_corpus, tmp_path, num_steps=4, eval_every=0, sample_every=0))
    code, out, _ = run_train_main(["eval", "--checkpoint", str(tmp_path), "--text", train_corpus["text"]], capsys)
    assert code is None or code == 0
    bpb = float(out.split(" bits per byte")[0].split()[-1])
    assert 1 < bpb < 9


def test_text_bpb_counts_every_byte_once(train_corpus):
    tok = Tokenizer.load(train_corpus["tokenizer"])
    model = tiny_gpt(vocab_size=tok.vocab_size)
    text = open(train_corpus["text"], encoding="utf-8").read()[:1500]
    ids = tok.encode(text)
    rt = tg.Runtime(torch.device("cpu"), None)
    res = tg.text_bpb(model, tok, text, 3, rt)
    # the same figure computed directly, one window at a time: loss summed over predicted tokens / bytes
    nats = 0.0
    for s in range(0, len(ids) - 1, 32):
        w = torch.tensor([ids[s:s + 33]])
        logits = model(w[:, :-1])[0]
        nats += torch.nn.functional.cross_entropy(logits[0], w[0, 1:], reduction="sum").item()
    predicted_bytes = len(tok.decode_bytes(ids[1:]))
    assert res["bpb"] == pytest.approx(nats / predicted_bytes / 0.6931471805599453, rel=1e-5)


def test_demo_shows_the_true_token_gaining_probability(train_corpus, tmp_path, capsys):
    tg.train(train_run_cfg(train_corpus, tmp_path, num_steps=4, eval_every=0, sample_every=0))
    code, out, _ = run_train_main(["demo", "--checkpoint", str(tmp_path), "--text", "the king and the queen"], capsys)
    line = next(l for l in out.splitlines() if "<- the true next token" in l)
    before, after = [float(v.rstrip("%")) for v in line.split("<-")[0].split()[-3::2]]
    assert after > before


def train_cli_flags(cfg):
    """The command line that reproduces a TrainConfig (the inverse of parse_config, for subprocess runs)."""
    flags = []
    for name, value in vars(cfg).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            flags += [flag, *value]
        else:
            flags += [flag, str(value)]
    return flags


@pytest.mark.slow
def test_two_processes_with_gloo_match_one_process_with_the_same_global_batch(train_corpus, tmp_path):
    common = dict(num_steps=5, eval_every=0, sample_every=0, total_batch_tokens=256)
    one = train_run_cfg(train_corpus, tmp_path / "one", batch_size=8, **common)  # 1 process x 8 windows
    two = train_run_cfg(train_corpus, tmp_path / "two", batch_size=4, **common)  # 2 processes x 4 windows
    tg.train(one)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(HERE, "train_gpt.py"), *train_cli_flags(two)], check=True, cwd=HERE, env=env,
                   capture_output=True, timeout=300)
    a, b = train_log_losses(tmp_path / "one"), train_log_losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    assert all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)
    assert a[5] < a[1] - 0.05  # and it is really training


@pytest.mark.slow
def test_torch_compile_on_cpu_gives_the_eager_losses(train_corpus, tmp_path):
    common = dict(num_steps=3, eval_every=0, sample_every=0)
    eager = tg.train(train_run_cfg(train_corpus, tmp_path / "eager", compile="off", **common))
    compiled = tg.train(train_run_cfg(train_corpus, tmp_path / "compiled", compile="on", **common))
    a, b = train_log_losses(tmp_path / "eager"), train_log_losses(tmp_path / "compiled")
    assert all(abs(a[k] - b[k]) < 1e-4 for k in a), (a, b)
    assert compiled["val_bpb"] == pytest.approx(eager["val_bpb"], abs=1e-3)


@pytest.mark.slow
def test_bench_train_reports_throughput_memory_and_time_to_target(train_corpus, tmp_path):
    sys.path.insert(0, HERE)
    from bench_train_part import bench_train
    res = bench_train("tiny", target_bpb=9.0, out_dir=str(tmp_path), **{
        k: v for k, v in vars(train_run_cfg(train_corpus, tmp_path, num_steps=4)).items()
        if k not in ("out_dir", "sample_every")})
    assert res["tokens_per_second"] > 0 and res["peak_memory_mb"] > 0 and res["mfu"] is None  # no MFU on CPU
    assert res["seconds_to_target"] is not None and 0 < res["seconds_to_target"] <= res["wall_seconds"]
    assert res["tokens"] == 4 * 256
