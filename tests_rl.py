"""Tests for rl.py (to be folded into test_all.py). Everything after the imports is self-contained: a tiny
random model on a byte-level tokenizer stands in for the SFT checkpoint."""
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rl
import train_gpt
from chat import Completion
from tokenizer import Tokenizer

RL_HERE = os.path.dirname(os.path.abspath(__file__))


# -- the verifier ----------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, key, right", [
    ("The 2 pears cost 2 * 4 = 8 dollars.\nThe answer is 8.", 8, True),
    ("The answer is $1,234.", 1234, True),                        # dollar sign and thousands comma
    ("That leaves a debt.\nThe answer is -7 dollars.", -7, True),  # negative, extra words after
    ("The answer is: about 12 apples, I think", 12, True),          # extra text around the number
    ("The answer is 3.\nWait, no.\nThe answer is 5.", 5, True),     # the last answer line counts
    ("The answer is 3.\nWait, no.\nThe answer is 5.", 3, False),
    ("The answer is 7.0", 7, True),                               # a tool's float output copied over
    ("Each apple costs 8 dollars.", 8, False),                    # the right number, but no answer line
    ("", 8, False),
    ("The answer is unknown.", 8, False),
    ("The answer is 80.", 8, False),
])
def test_verifier_reads_the_final_answer_line(reply, key, right):
    assert rl.is_correct(reply, key) is right


# -- advantages and the best-of-N selector -----------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, 1.0]), min_size=4, max_size=4), min_size=1, max_size=6),
       st.booleans())
def test_group_advantages_sum_to_zero_in_every_group(groups, std_norm):
    rewards = torch.tensor([r for g in groups for r in g])
    adv = rl.group_advantages(rewards, 4, std_norm).view(-1, 4)
    assert torch.allclose(adv.sum(dim=1), torch.zeros(len(groups)), atol=1e-5)
    for g, a in zip(groups, adv):
        if len(set(g)) == 1:  # all right or all wrong: nothing to learn from this problem
            assert torch.all(a == 0)
        else:  # right attempts are pushed up, wrong ones down
            assert all((x > 0) == (r == 1.0) for x, r in zip(a.tolist(), g))


def test_best_selector_keeps_the_shortest_correct_attempt_per_group():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    lengths = [30, 5, 12, 12, 9, 9, 9, 9, 20, 20, 1, 1]
    weights = rl.best_weights(rewards, lengths, 4)
    # group 0: the correct ones are 30, 12, 12 tokens long -> the first 12; group 1: none correct;
    # group 2: a tie at 20 -> the first; the wrong 1-token attempts are never kept
    assert weights.tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0]


# -- the update on a tiny model -----------------------------------------------------------------------

def rl_tok():
    return Tokenizer([])  # no merges: one token per byte, then the special tokens


def rl_model(vocab, seed=0, seq_len=512):
    torch.manual_seed(seed)
    model = train_gpt.GPT(train_gpt.GPTConfig(vocab_size=vocab, seq_len=seq_len, n_layer=1, n_embd=32, n_head=2,
                                              n_kv_head=2))
    with torch.no_grad():  # the output projections start at zero; give every layer a say
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def rl_cfg(**over):
    return rl.RLConfig(**{"samples": 2, "problems_per_step": 1, "micro_batch": 2, "device": "cpu", **over})


def attempts(tok):
    """Two attempts at one prompt; the second used the code tool, whose pasted output the model never chose."""
    prompt = tok.encode("Q: 2+3?")
    right = Completion(0, tok.encode("The answer is 5.<|im_end|>", allowed_special="all"), [], "stop")
    right.sampled = [1] * len(right.tokens)
    call = tok.encode("<|code_start|>2-3<|code_end|><|output_start|>-1<|output_end|>The answer is -1.<|im_end|>",
                      allowed_special="all")
    forced_from = call.index(tok.special_id("<|output_start|>"))
    forced_to = call.index(tok.special_id("<|output_end|>"))
    wrong = Completion(0, call, [0 if forced_from <= i <= forced_to else 1 for i in range(len(call))], "stop")
    return [prompt, prompt], [right, wrong]


def logprob_of_attempts(model, inputs, targets):
    with torch.no_grad():
        return rl.token_logprobs(model, inputs, targets).sum(dim=1)


def test_pack_learns_only_the_tokens_the_model_chose():
    tok = rl_tok()
    prompts, completions = attempts(tok)
    inputs, targets = rl.pack(tok, prompts, completions)
    wrong = completions[1]
    trained = targets[1][targets[1] >= 0].tolist()
    assert trained == [t for t, s in zip(wrong.tokens, wrong.sampled) if s]  # no prompt, no tool output
    assert len(targets[1]) - len(prompts[1]) + 1 == len(wrong.tokens)
    assert inputs[0, :len(prompts[0])].tolist() == prompts[0]


def test_one_update_raises_the_rewarded_attempt_and_lowers_the_other():
    tok = rl_tok()
    model, reference = rl_model(tok.vocab_size), rl_model(tok.vocab_size)
    prompts, completions = attempts(tok)
    inputs, targets = rl.pack(tok, prompts, completions)
    cfg = rl_cfg()
    weights = rl.group_advantages(torch.tensor([1.0, 0.0]), 2)
    before = logprob_of_attempts(model, inputs, targets)
    optimizers = train_gpt.build_optimizers(model, cfg, "cpu")
    rt = train_gpt.setup_runtime("cpu")
    kl = rl.learn(model, reference, optimizers, inputs, targets, weights, cfg, rt, 1.0)
    after = logprob_of_attempts(model, inputs, targets)
    assert after[0] > before[0] and after[1] < before[1]
    assert kl == pytest.approx(0.0, abs=1e-6)  # measured before the update, where policy == reference


def test_a_group_with_equal_rewards_gives_no_gradient_and_no_update():
    tok = rl_tok()
    model = rl_model(tok.vocab_size)
    prompts, completions = attempts(tok)
    inputs, targets = rl.pack(tok, prompts, completions)
    for rewards in ([1.0, 1.0], [0.0, 0.0]):
        weights = rl.group_advantages(torch.tensor(rewards), 2, std_norm=True)
        logp = rl.token_logprobs(model, inputs, targets)
        mask = (targets >= 0).float()
        loss, _ = rl.policy_loss(logp, logp.detach(), logp.detach(), weights, mask, 0.2, 0.0)
        loss.backward()
        assert all(p.grad is None or torch.all(p.grad == 0) for p in model.parameters())
        model.zero_grad(set_to_none=True)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        optimizers = train_gpt.build_optimizers(model, rl_cfg(), "cpu")
        rl.learn(model, model, optimizers, inputs, targets, weights, rl_cfg(), train_gpt.setup_runtime("cpu"), 1.0)
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_ratio_clipping_stops_pushing_a_token_already_moved_far_enough():
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.0, 0.0]])  # token 0 is now e times likelier than when sampled, token 1 unchanged
    loss, _ = rl.policy_loss(logp, old, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2), 0.2, 0.0)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] < 0


def test_kl_penalty_is_zero_at_the_reference_and_positive_away_from_it():
    ref = torch.log_softmax(torch.randn(3, 5), dim=-1)
    _, kl_same = rl.policy_loss(ref, ref, ref, torch.zeros(3), torch.ones(3, 5), 0.2, 1.0)
    _, kl_moved = rl.policy_loss(ref + 0.3, ref, ref, torch.zeros(3), torch.ones(3, 5), 0.2, 1.0)
    assert kl_same.item() == pytest.approx(0.0, abs=1e-6) and kl_moved.item() > 0


# -- end to end ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rl_checkpoint(tmp_path_factory):
    """A tiny random 'SFT' checkpoint on the byte tokenizer (prompts are ~150 bytes, hence seq_len 512)."""
    tok = rl_tok()
    path = str(tmp_path_factory.mktemp("sft") / "model.pt")
    train_gpt.save_checkpoint(path, rl_model(tok.vocab_size), tok, 0, {}, stage="sft")
    return path


def test_one_rl_step_runs_end_to_end_and_writes_checkpoint_metrics_curves(rl_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "rl")
    for algo in ("pg", "best"):
        cfg = rl_cfg(checkpoint=rl_checkpoint, out_dir=out, algo=algo, num_steps=1, max_tokens=6, eval_problems=2,
                     pass_k=2, show_every=1, kl_coef=0.1, updates_per_batch=2)
        metrics = rl.train(cfg)
        with open(os.path.join(out, "metrics.json")) as f:
            assert json.load(f) == metrics
        for key in ("pass1_before", "pass1_after", "passk_before", "passk_after"):
            assert 0.0 <= metrics[key] <= 1.0
        assert metrics["k"] == 2 and metrics["train_seconds"] > 0
        model, _, meta = train_gpt.load_checkpoint(out)
        assert meta["stage"] == "rl" and meta["step"] == 1
        assert os.path.exists(os.path.join(out, "curves.txt"))
        with open(os.path.join(out, "log.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        step = next(r for r in rows if "reward" in r)
        assert {"reward", "no_signal", "length", "kl", "sample_s", "learn_s"} <= set(step)
    printed = capsys.readouterr().out
    assert "algo best" in printed and "KL penalty to SFT: on" in printed and "ratio clipping: on" in printed
    assert "attempts got the right answer" in printed


def test_same_seed_same_run(rl_checkpoint, tmp_path):
    def run(name):
        cfg = rl_cfg(checkpoint=rl_checkpoint, out_dir=str(tmp_path / name), num_steps=1, max_tokens=6,
                     eval_problems=2, pass_k=2, show_every=0)
        rl.train(cfg)
        with open(tmp_path / name / "log.jsonl") as f:
            return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")} for line in f]
    assert run("a") == run("b")


@pytest.mark.parametrize("args, fragment", [
    (["--algo", "ppo"], "--algo must be pg or best"),
    (["--samples", "1"], "at least 2"),
    (["--task", "mnist"], "--task must be"),
    (["--checkpoint", "no/such/dir"], "no checkpoint at"),
    (["--num-steps", "three"], "invalid int value"),
])
def test_user_mistakes_end_with_one_line_and_exit_code_2(args, fragment, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(RL_HERE, "rl.py"), "--out-dir", str(tmp_path), *args],
                            capture_output=True, text=True, cwd=str(tmp_path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0]
