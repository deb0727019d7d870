from test_all import HERE, rl_tok, rl_model, rl_checkpoint, chat, data, rl, train_gpt, torch, pytest, math, random, os, json, sys, subprocess, given, st  # noqa
import rlhf

# ====================================================================================================
# rlhf.py
# ====================================================================================================


def test_human_score_likes_topic_real_words_verse_length_and_hates_repetition():
    good = "And love is strong as death, and cruel as the grave."
    assert rlhf.human_score(good, "love") > rlhf.human_score(good, "sea")  # on topic beats off topic
    assert rlhf.human_score(good, "love") > rlhf.human_score("Love zxqv blorp wug fnord snarf.", "love")
    assert rlhf.human_score(good, "love") > rlhf.human_score("Love.", "love")  # too short for a line
    assert rlhf.human_score("love love love love love love love", "love") < 0.2
    assert rlhf.human_score("", "love") == 0.0
    for text in ("the", good, "love " * 30, "12 34 !!"):
        assert 0.0 <= rlhf.human_score(text, "love") <= 1.0


def test_human_order_is_best_first_and_noise_blurs_it():
    replies = ["love love love love", "The sea is calm tonight, and love is near.", "Love."]
    order, scores = rlhf.human_order(replies, "love", 0.0, random.Random(0))
    assert order == sorted(range(3), key=lambda i: -scores[i]) and order[0] == 1
    orders = {tuple(rlhf.human_order(replies, "love", 1.0, random.Random(s))[0]) for s in range(30)}
    assert len(orders) > 1  # noisy people disagree


def test_ranking_loss_gradient_raises_the_better_items_score():
    logits = torch.zeros(1, 3, requires_grad=True)
    human = torch.tensor([[0.9, 0.1, 0.5]])  # item 0 best, item 1 worst
    rlhf.ranking_loss(logits, human).backward()
    assert logits.grad[0, 0] < 0 < logits.grad[0, 1]  # descent raises item 0 and lowers item 1
    right = rlhf.ranking_loss(torch.tensor([[3.0, -3.0, 0.0]]), human)
    wrong = rlhf.ranking_loss(torch.tensor([[-3.0, 3.0, 0.0]]), human)
    assert right < math.log(2) < wrong  # log 2 = the loss of a model that scores everything the same


def test_ranking_loss_ignores_ties_and_counts_all_pairs():
    human = torch.tensor([[0.5, 0.5]])
    assert rlhf.ranking_loss(torch.tensor([[5.0, -5.0]]), human).item() == 0.0  # a tie teaches nothing
    assert rlhf.better_pairs(torch.rand(4, 5) + torch.arange(5.0)).sum().item() == 4 * 10  # 5 choose 2 per group


@given(st.lists(st.lists(st.integers(0, 9), min_size=2, max_size=6), min_size=1, max_size=4))
def test_a_perfectly_ordered_reward_model_has_pairwise_accuracy_one(groups):
    k = min(map(len, groups))
    human = torch.tensor([g[:k] for g in groups], dtype=torch.float32) / 10
    if rlhf.better_pairs(human).sum() == 0:
        return  # all ties: no pair to judge
    assert rlhf.pairwise_accuracy(torch.sigmoid(human * 3 - 1), human) == 1.0  # any increasing function of it
    assert rlhf.pairwise_accuracy(-human, human) == 0.0


def test_kl_term_is_zero_for_the_reference_policy_itself():
    tok = rl_tok()
    model = rl_model(tok.vocab_size)
    prompt = tok.encode("Write a line about love.")
    reply = chat.Completion(0, tok.encode("Love is all.<|im_end|>", allowed_special="all"), [], "stop")
    reply.sampled = [1] * len(reply.tokens)
    inputs, targets = rl.pack(tok, [prompt], [reply])
    logp = rl.token_logprobs(model, inputs, targets)
    mask = (targets >= 0).float()
    _, kl = rl.policy_loss(logp, logp, logp, torch.ones(1), mask, 0.2, 1.0)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("text, flagged", [
    ("the the the the the", True), ("love love love love is love", True),
    ("my heart, my heart, my heart", True), ("And love is strong as death, and cruel as the grave.", False),
    ("Shall I compare thee to a summer's day?", False), ("love love", False),
])
def test_hacking_monitor_flags_degenerate_repetitive_samples(text, flagged):
    assert rlhf.is_degenerate(text) == flagged


def test_reward_model_scores_in_unit_interval_and_read_the_last_token():
    tok = rl_tok()
    rm = rlhf.RewardModel(rl_model(tok.vocab_size))
    prompts = [tok.encode("Q"), tok.encode("Q longer prompt")]
    replies = [tok.encode("a"), tok.encode("bb")]
    scores = rlhf.reward_scores(rm, tok, prompts, replies)
    assert scores.shape == (2,) and ((scores > 0) & (scores < 1)).all()
    alone = rlhf.reward_scores(rm, tok, prompts[:1], replies[:1])  # padding of the batch changes nothing
    assert alone[0].item() == pytest.approx(scores[0].item(), abs=1e-5)


def test_verse_prompts_deterministic_and_split_by_question():
    a, b = data.verse_prompts(20, 1, "train"), data.verse_prompts(20, 1, "train")
    assert a == b and all(data.split_of(p["question"]) == "train" for p in a)
    held = data.verse_prompts(10, 1, "heldout")
    assert not {p["question"] for p in held} & {p["question"] for p in data.verse_prompts(300, 2, "train")}
    row = data.verse_conversation(random.Random(3))
    assert row["topic"] in row["messages"][1]["content"].lower()


def test_rlhf_runs_end_to_end_then_hack_reuses_the_reward_model(rl_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "rlhf")
    small = dict(checkpoint=rl_checkpoint, out_dir=out, rank_prompts=4, rank_k=3, heldout_prompts=2, rm_epochs=1,
                 rm_batch=2, num_steps=2, prompts_per_step=2, samples=2, max_tokens=6, eval_every=1, eval_samples=2,
                 hack_steps=2, device="cpu")
    metrics = rlhf.train(rlhf.RLHFConfig(**small))
    for key in ("rm_pair_accuracy", "true_reward_sft", "true_reward_final", "proxy_reward_final"):
        assert 0.0 <= metrics[key] <= 1.0
    _, _, meta = train_gpt.load_checkpoint(out)
    assert meta["stage"] == "rlhf"
    printed = capsys.readouterr().out
    assert "1,000,000,000 judgements" in printed and "human rank (points) | RM before | RM after" in printed
    metrics = rlhf.train(rlhf.RLHFConfig(**small, hack=True))
    assert "reward model: " + os.path.join(out, "reward_model.pt") in capsys.readouterr().out  # not retrained
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    assert saved == metrics and {"hack_true_peak", "hack_true_final", "hack_proxy_final", "rm_pair_accuracy"} <= set(saved)
    assert saved["hack_true_peak"] >= saved["hack_true_final"]
    assert os.path.exists(os.path.join(out, "hack_curves.txt")) and os.path.exists(os.path.join(out, "rl_curves.txt"))


@pytest.mark.parametrize("args, fragment", [
    (["--rank-k", "1"], "at least 2"),
    (["--temperature", "0"], "must be > 0"),
    (["--checkpoint", "no/such/dir"], "no checkpoint at"),
    (["--num-steps", "many"], "invalid int value"),
])
def test_rlhf_user_mistakes_end_with_one_line_and_exit_code_2(args, fragment, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(HERE, "rlhf.py"), "--out-dir", str(tmp_path), *args],
                            capture_output=True, text=True, cwd=str(tmp_path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0]


def test_report_card_gathers_stages_and_draws_their_curves(tmp_path):
    """write_metrics refreshes out/report.md and report.json from every stage folder; each stage's curves
    appear as text, and as a PNG when matplotlib is installed."""
    base = tmp_path / "base"
    train_gpt.save_curves(str(base), "loss_curve", "pretraining", {"training loss": [(0, 5.0), (1, 4.0), (2, 3.5)]})
    train_gpt.write_metrics(str(base), {"val_bpb": 2.25, "params": 1000, "tokens": 4096, "train_seconds": 3.0})
    train_gpt.write_metrics(str(tmp_path / "rlhf"), {"rm_pair_accuracy": 0.8, "hack_true_peak": 0.5})
    report = (tmp_path / "report.md").read_text()
    assert "## base: pretraining" in report and "| val_bpb | 2.25 |" in report and "| rm_pair_accuracy | 0.8 |" in report
    assert "pretraining, training loss:" in report and "Machine:" in report
    stages = json.loads((tmp_path / "report.json").read_text())["stages"]
    assert stages["base"]["tokens"] == 4096 and set(stages) == {"base", "rlhf"}
    try:
        import matplotlib  # noqa: F401  (optional: without it the report has the text curves only)
    except ImportError:
        assert not (base / "loss_curve.png").exists()
    else:
        assert (base / "loss_curve.png").read_bytes()[:4] == b"\x89PNG" and "![base loss_curve](base/loss_curve.png)" in report
