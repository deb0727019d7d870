"""Tests for sft.py and the post-training datasets of data.py (to be folded into test_all.py).
Fast unless marked slow."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import data
import sft
from chat import Search, run_code
from tokenizer import Tokenizer, render_conversation
from train_gpt import GPT, GPTConfig, UserError, build_optimizers, save_checkpoint, setup_runtime

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable


# -- word problems and the answer line (shared with rl.py) ----------------------------------------

def test_word_problem_is_deterministic_and_self_consistent():
    a = [data.word_problem(random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = random.Random(1)
    for _ in range(200):
        p = data.word_problem(rng, difficulty=rng.randint(1, 4))
        assert isinstance(p["answer"], int)
        for text in (p["solution"], p["tool_solution"]):
            assert text.splitlines()[-1] == f"{data.ANSWER_PREFIX} {p['answer']}."
            assert data.extract_answer(text) == p["answer"]
        assert "<|code_start|>" in p["tool_solution"] and "<|code_start|>" not in p["solution"]


def test_tool_solution_outputs_are_what_the_code_tool_returns():
    rng = random.Random(3)
    for _ in range(100):
        text = data.word_problem(rng, 3)["tool_solution"]
        for call in text.split("<|code_start|>")[1:]:
            expression, rest = call.split("<|code_end|>")
            output = rest.split("<|output_start|>")[1].split("<|output_end|>")[0]
            assert run_code(expression) == output


def test_difficulty_scales_the_numbers():
    def biggest(difficulty):
        rng = random.Random(0)
        return max(data.word_problem(rng, difficulty)["answer"] for _ in range(300))
    assert biggest(1) < biggest(3) < biggest(6)
    with pytest.raises(data.DataError):
        data.word_problem(random.Random(0), 0)


@pytest.mark.parametrize("text, expected", [
    ("The answer is 42.", 42), ("the answer is $1,234.", 1234), ("The answer is -7", -7),
    ("The answer is $-7.", -7), ("Step 1\nThe answer is 3.\nThe answer is 5 dollars.", 5),
    ("The answer is 2.5.", 2.5), ("The answer is: about 12 apples", 12), ("no answer here", None),
    ("The answer is unknown.", None), ("", None), ("The answer is 7.0", 7.0)])
def test_extract_answer(text, expected):
    got = data.extract_answer(text)
    assert got == expected and type(got) is type(expected)


def test_practice_problems_deterministic_and_splits_disjoint():
    train = data.practice_problems(300, seed=0)
    assert train == data.practice_problems(300, seed=0)
    assert train != data.practice_problems(300, seed=1)
    held = [p for s in range(5) for p in data.practice_problems(60, seed=s, split="heldout")]
    train += [p for s in range(1, 4) for p in data.practice_problems(300, seed=s)]
    assert not {p["question"] for p in train} & {p["question"] for p in held}
    assert all(data.split_of(p["question"]) == "heldout" for p in held)
    assert len({p["question"] for p in data.practice_problems(100, 0)}) == 100
    with pytest.raises(data.DataError):
        data.practice_problems(3, 0, split="test")


# -- the loss mask and the training step ------------------------------------------------------------

def byte_tokenizer():
    return Tokenizer([])  # no merges: one token per byte, plus the special tokens; enough for the protocol


TOOL_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2*3? Use code."},
             {"role": "assistant", "content": "Let me see. <|code_start|>2*3<|code_end|><|output_start|>6"
                                              "<|output_end|>\nThe answer is 6."}]


def test_targets_are_exactly_the_assistant_spans_with_tool_calls_never_tool_outputs():
    tok = byte_tokenizer()
    ids, mask = render_conversation(tok, TOOL_CHAT)
    x, y = sft.collate([(ids, mask)], pad_id=0)
    assert x[0].tolist() == ids[:-1]
    trained = [t for t in y[0].tolist() if t >= 0]
    assert tok.decode(trained) == "Let me see. <|code_start|>2*3<|code_end|>\nThe answer is 6.<|im_end|>"
    out_start = tok.special_id("<|output_start|>")
    assert out_start not in trained and tok.special_id("<|output_end|>") not in trained


def small_model(tok, seed=0, seq_len=128):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, seq_len=seq_len, n_layer=1, n_embd=32, n_head=2, n_kv_head=2))


def test_padding_is_ignored_and_a_fully_masked_batch_gives_a_finite_loss_and_no_update():
    tok, rt, cfg = byte_tokenizer(), setup_runtime("cpu"), sft.SFTConfig()
    model = small_model(tok)
    optimizers = build_optimizers(model, cfg, "cpu")
    prompt_only = render_conversation(tok, [{"role": "user", "content": "hello there"}])  # mask all 0
    before = [p.detach().clone() for p in model.parameters()]
    loss, grad_norm, tokens = sft.train_step(model, optimizers, [prompt_only] * 3, 1.0, cfg, rt, pad_id=0)
    assert loss == 0.0 and tokens == 0 and grad_norm == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # a short and a long conversation in one batch: the short one's padding adds nothing to the loss
    short, long_ = render_conversation(tok, TOOL_CHAT[1:]), render_conversation(tok, TOOL_CHAT)
    x, y = sft.collate([short], 0)
    alone = sft.masked_loss(model, x, y, rt)
    x, y = sft.collate([short, prompt_only], 0)
    padded = sft.masked_loss(model, x, y, rt)
    assert torch.allclose(alone[0], padded[0], atol=1e-4) and alone[1] == padded[1]
    loss, _, tokens = sft.train_step(model, optimizers, [short, long_], 1.0, cfg, rt, pad_id=0)
    assert math.isfinite(loss) and tokens > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# -- the conversation generators --------------------------------------------------------------------

GENERATORS = [data.identity_conversation, data.word_problem_conversation, data.arithmetic_conversation,
              data.counting_conversation, data.unknown_name_conversation, data.lecture_conversation]


@pytest.mark.parametrize("make", GENERATORS, ids=lambda f: f.__name__)
def test_generators_are_deterministic_and_render(make):
    first = [make(random.Random(5)) for _ in range(2)]
    rng_a, rng_b = random.Random(9), random.Random(9)
    assert first[0] == first[1] and [make(rng_a) for _ in range(30)] == [make(rng_b) for _ in range(30)]
    tok = byte_tokenizer()
    rng = random.Random(1)
    for _ in range(30):
        row = make(rng)
        ids, mask = render_conversation(tok, row["messages"])
        assert sum(mask) > 0 and row["split"] in ("train", "heldout")


def test_tool_conversations_hold_what_the_code_tool_returns():
    rng = random.Random(2)
    for make in (data.arithmetic_conversation, data.counting_conversation):
        for _ in range(50):
            reply = make(rng)["messages"][-1]["content"]
            code = reply.split("<|code_start|>")[1].split("<|code_end|>")[0]
            output = reply.split("<|output_start|>")[1].split("<|output_end|>")[0]
            assert run_code(code) == output and reply.endswith(f"{data.ANSWER_PREFIX} {output}.")


def test_invented_names_appear_nowhere_in_the_corpus():
    corpus, rng = data.corpus_text_lower(), random.Random(0)
    for _ in range(50):
        assert all(part.lower() not in corpus for part in data.invented_name(rng, corpus).split())


@pytest.fixture
def mixture_without_models(tmp_path):
    """build_mixture with the model parts stubbed: no base model verdicts, a two-file search folder."""
    (tmp_path / "a.txt").write_text("First line of the first poem here\nSecond line of it follows now\n")
    (tmp_path / "b.txt").write_text("Another document with other words in it\nand a closing line for it\n")
    search, cfg = Search(str(tmp_path)), sft.SFTConfig(conversations=400)
    known = {name: 1.0 for name, _, _ in data.play_characters()[::3]}
    return lambda **kw: sft.build_mixture(cfg, known, search, byte_tokenizer(), **kw)


def test_mixture_is_deterministic_and_never_holds_a_heldout_question(mixture_without_models):
    def questions(mixture):
        return [m["content"] for rows in mixture.values() for r in rows for m in r["messages"] if m["role"] == "user"]
    train = mixture_without_models()
    assert train == mixture_without_models()
    assert all(r["split"] == "train" for rows in train.values() for r in rows)
    assert len(train["identity"]) > 0 and len(train["search"]) > 0
    heldout = mixture_without_models(split="heldout", seed=99, n=400)
    generated = {k: v for k, v in heldout.items() if k != "lecture"}
    for r in (r for rows in generated.values() for r in rows):  # a problem's split ignores the "Use code." cue
        assert data.split_of(r["messages"][-2]["content"].removesuffix(data.USE_CODE)) == "heldout"
    assert not set(questions(train)) & set(questions(generated))


# -- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, problem", [
    ("{not json", "Expecting"), ('{"text": "hi"}', '"messages"'),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant"),
    ('{"messages": [{"role": "user", "content": "<|code_start|>1<|code_end|>"}, '
     '{"role": "assistant", "content": "1"}]}', "only appear inside an assistant turn")])
def test_a_bad_jsonl_line_names_file_line_and_problem(tmp_path, line, problem):
    good = json.dumps({"messages": TOOL_CHAT})
    path = tmp_path / "chats.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(data.DataError, match=rf"chats.jsonl:2: .*{problem}"):
        data.read_conversations(str(path))
    path.write_text(good + "\n\n" + good + "\n")
    assert len(data.read_conversations(str(path))) == 2


def test_cli_bad_jsonl_is_one_line_and_exit_code_2(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": []}\n')
    r = subprocess.run([PY, "sft.py", "--data", str(path), "--base", str(tmp_path / "none.pt")],
                       cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bad.jsonl:1" in r.stderr


def test_a_base_checkpoint_from_another_tokenizer_is_refused(tmp_path):
    tok, rt = byte_tokenizer(), setup_runtime("cpu")
    path = str(tmp_path / "base.pt")
    save_checkpoint(path, small_model(tok), tok, 0, {})
    assert sft.load_model(path, rt, tok)[1].hash() == tok.hash()
    with pytest.raises(UserError, match="tokenizer"):
        sft.load_model(path, rt, Tokenizer([(97, 98)]))
    no_chat = Tokenizer([], special_tokens=("<|endoftext|>",))
    save_checkpoint(path, small_model(no_chat), no_chat, 0, {})
    with pytest.raises(UserError, match="chat tokens"):
        sft.load_model(path, rt)
    other = tmp_path / "other.json"
    Tokenizer([(97, 98)]).save(str(other))
    save_checkpoint(path, small_model(tok), tok, 0, {})
    r = subprocess.run([PY, "sft.py", "--base", path, "--tokenizer", str(other)], cwd=HERE, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "tokenizer" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.slow
def test_end_to_end_tiny_run_writes_a_usable_checkpoint_and_metrics(tmp_path):
    tok = byte_tokenizer()
    base = str(tmp_path / "base.pt")
    save_checkpoint(base, small_model(tok, seq_len=512), tok, 0, {})  # byte tokens: prompts need room
    out = tmp_path / "sft"
    r = subprocess.run([PY, "sft.py", "--base", base, "--out-dir", str(out), "--num-steps", "2", "--conversations",
                        "60", "--eval-prompts", "2", "--eval-tokens", "8", "--interrogate-samples", "1"],
                       cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("format_rate", "identity_rate", "refusal_unknown_rate", "answer_known_rate", "tool_accuracy",
                "word_problem_accuracy", "train_seconds"):
        assert key in metrics
        assert key == "train_seconds" or 0 <= metrics[key] <= 1
    assert "step 2/2" in r.stdout and "base" in r.stdout and (out / "log.jsonl").exists()
    model, loaded_tok, meta = sft.load_model(str(out / "model.pt"), setup_runtime("cpu"), tok)
    assert meta["stage"] == "sft" and meta["metrics"]["format_rate"] == metrics["format_rate"]
    r = subprocess.run([PY, "sft.py", "eval", "--checkpoint", str(out), "--base", base, "--eval-prompts", "2",
                        "--eval-tokens", "8"], cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["format_rate"] == metrics["format_rate"]
