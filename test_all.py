"""
test_all.py -- properties and end-to-end checks of every stage (pytest + hypothesis).

    python -m pytest -q test_all.py            # everything but the slow marks
    python -m pytest -q test_all.py -m slow    # the slow ones

Tests never touch the network (a download test talks to a server it starts on 127.0.0.1) and never read
outside the repository.
"""
import json
import os
import subprocess
import sys

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data
import tokenizer
from tokenizer import SPECIAL_TOKENS, Tokenizer, render_conversation, render_for_completion

HERE = os.path.dirname(os.path.abspath(__file__))
settings.register_profile("repo", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("repo")


def run_cli(*args, cwd=HERE):
    """Run `python <args>` in the repo; returns the CompletedProcess (text mode)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


# ====================================================================================================
# tokenizer.py

# Text that exercises the byte level: emoji (4-byte UTF-8, ZWJ sequences, skin tones), CJK, combining
# marks, right-to-left script, whitespace runs, Windows line ends, digits, and the special-token literals.
UNICODE_SAMPLES = [
    "Hello 👋🏽 world! 👨‍👩‍👧 family", "世界你好，こんにちは。안녕하세요", "e\u0301 n\u0303 a\u030a\u0323",
    "مرحبا بالعالم", "tabs\t\tand   spaces\r\n\r\n\n  end  ", "12345 + 678 = 13023; 3.14159",
    "<|endoftext|> <|im_start|>user<|im_sep|>hi<|im_end|>", "naïve café — “quotes” ‘too’ …",
]
unicode_text = st.one_of(
    st.text(),
    st.lists(st.sampled_from(list("ab \n\r\t1234567890.,!'") + ["👋", "世", "e\u0301", "\u200d", "ß"])).map("".join),
    st.lists(st.sampled_from(UNICODE_SAMPLES + list(SPECIAL_TOKENS)), max_size=6).map("".join),
)


@pytest.fixture(scope="module")
def corpus_tok():
    """Trained on the embedded corpus (a few MB of English) at the full 8192 vocabulary."""
    return Tokenizer.train(data.embedded_documents("train"), 8192)


@pytest.fixture(scope="module")
def unicode_tok():
    """Trained on Unicode-heavy text, so that its merges join multi-byte characters too."""
    texts = iter([" ".join(UNICODE_SAMPLES) * 40, "the cat sat on the mat " * 50])
    return Tokenizer.train(texts, 256 + len(SPECIAL_TOKENS) + 150)


def test_bpe_basics_first_merge_and_compression():
    """SPEC X1: 256 byte ids; the first merge is the most frequent pair and gets id 256; more merges give
    shorter sequences; bits are 8x bytes."""
    text = "aaab aaab aaab xy"
    tok = Tokenizer.train(iter([text]), 256 + len(SPECIAL_TOKENS) + 1)
    assert tok.merges == [(ord("a"), ord("a"))]  # "aa" occurs 6 times, more than any other pair
    assert tok.vocab[:256] == [bytes([i]) for i in range(256)] and tok.vocab[256] == b"aa"
    assert tok.special_id("<|endoftext|>") == 257
    longer = Tokenizer.train(iter([text]), 256 + len(SPECIAL_TOKENS) + 5)
    assert len(longer.encode(text)) < len(tok.encode(text)) < len(text.encode())
    assert tokenizer.Tokenizer([]).encode("héllo") == list("héllo".encode())  # no merges = plain bytes


def test_merges_equal_rustbpe_on_embedded_corpus(corpus_tok):
    """Exactness: on the embedded corpus at vocab 8192, every merged token is the one rustbpe mints at
    the same id (same tie rule: highest count, then smallest pair)."""
    rustbpe = pytest.importorskip("rustbpe")
    reference = rustbpe.Tokenizer()
    n_regular = 8192 - len(SPECIAL_TOKENS)
    reference.train_from_iterator(data.embedded_documents("train"), n_regular, pattern=tokenizer.SPLIT_PATTERN)
    theirs = [bytes(b) for b, _ in sorted(reference.get_mergeable_ranks(), key=lambda pair: pair[1])]
    assert len(corpus_tok.merges) == n_regular - 256
    assert theirs == corpus_tok.vocab


def test_training_from_files_matches_training_from_strings(tmp_path):
    """A file is read in blocks cut only where no chunk can cross, so merges do not depend on the cut."""
    text = "\n\n".join(f"Scene {i}. The   king\r\nspeaks {i * 37}!\n" for i in range(400))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8", newline="")
    blocks = list(tokenizer.read_text_blocks(path, block_chars=500))
    assert len(blocks) > 10 and "".join(blocks) == text
    from_file = Tokenizer.train(str(path), 400)
    from_iter = Tokenizer.train(iter([text]), 400)
    from_one_worker = Tokenizer.train(iter([text]), 400, workers=1)
    assert from_file.merges == from_iter.merges == from_one_worker.merges


@given(unicode_text)
def test_round_trip_any_text(corpus_tok, unicode_tok, text):
    for tok in (corpus_tok, unicode_tok):
        assert tok.decode(tok.encode(text)) == text


@given(st.binary())
def test_round_trip_raw_bytes(unicode_tok, raw):
    assert unicode_tok.decode_bytes(unicode_tok.encode_bytes(raw)) == raw


@given(unicode_text)
def test_encode_equals_tiktoken_from_our_merges(corpus_tok, unicode_tok, text):
    pytest.importorskip("tiktoken")
    for tok in (corpus_tok, unicode_tok):
        assert tok.encode(text) == tok.to_tiktoken().encode_ordinary(text)


@given(unicode_text)
def test_special_tokens_only_when_allowed(unicode_tok, text):
    first_special = len(unicode_tok.vocab)
    assert all(i < first_special for i in unicode_tok.encode(text))
    allowed = unicode_tok.encode(text, allowed_special="all")
    n_literals = len(regex.findall("|".join(regex.escape(s) for s in SPECIAL_TOKENS), text))
    assert sum(i >= first_special for i in allowed) == n_literals
    assert unicode_tok.decode(allowed) == text


def test_special_tokens_are_single_ids(unicode_tok):
    """SPEC X5: each special token is one id; as ordinary text the same string is several tokens."""
    for name in SPECIAL_TOKENS:
        assert unicode_tok.encode(name, allowed_special=[name]) == [unicode_tok.special_id(name)]
        assert len(unicode_tok.encode(name)) > 1
    with pytest.raises(ValueError, match="unknown special"):
        unicode_tok.encode("x", allowed_special=["<|nope|>"])


@given(st.lists(st.integers(min_value=0, max_value=256 + 150 + len(SPECIAL_TOKENS) - 1)))
def test_decode_arbitrary_ids_never_crashes(unicode_tok, ids):
    text = unicode_tok.decode(ids)
    raw = unicode_tok.decode_bytes(ids)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        assert "\ufffd" in text
        with pytest.raises(UnicodeDecodeError):
            unicode_tok.decode(ids, errors="strict")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        unicode_tok.decode(ids + [unicode_tok.vocab_size])


def test_encode_batch_equals_serial(corpus_tok):
    docs = [f"Document {i}: " + UNICODE_SAMPLES[i % len(UNICODE_SAMPLES)] * (i % 7) for i in range(64)]
    assert corpus_tok.encode_batch(docs) == [corpus_tok.encode(d) for d in docs]


def test_save_load_round_trip_and_corrupt_files(unicode_tok, tmp_path):
    path = tmp_path / "tok.json"
    unicode_tok.save(str(path))
    loaded = Tokenizer.load(str(path))
    assert loaded.merges == unicode_tok.merges and loaded.special_tokens == unicode_tok.special_tokens
    assert loaded.hash() == unicode_tok.hash() and loaded.encode("hi 世界") == unicode_tok.encode("hi 世界")
    blob = path.read_text()
    path.write_text(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        Tokenizer.load(str(path))
    bad = json.loads(blob)
    bad["merges"][3] = [9999, 1]
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="merge 3"):
        Tokenizer.load(str(path))
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        Tokenizer.load(str(tmp_path / "missing.json"))


# -- chat rendering ----------------------------------------------------------------------------------

def test_render_matches_the_protocol(unicode_tok):
    """SPEC X5/S3: <|im_start|>role<|im_sep|>content<|im_end|>, the assistant reply trained on."""
    tok = unicode_tok
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2 = 4"}]
    ids, mask = render_conversation(tok, messages)
    assert tok.decode(ids) == ("<|im_start|>user<|im_sep|>What is 2+2?<|im_end|>"
                               "<|im_start|>assistant<|im_sep|>2+2 = 4<|im_end|>")
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained) == "2+2 = 4<|im_end|>"
    prompt = render_for_completion(tok, messages[:1])
    assert prompt == ids[:len(prompt)] and tok.decode(prompt).endswith("<|im_start|>assistant<|im_sep|>")


def test_render_tool_calls_train_on_the_call_not_the_output(unicode_tok):
    tok = unicode_tok
    reply = "Let me compute. <|code_start|>(869 - 177*4) / 23<|code_end|><|output_start|>7.0<|output_end|> $7."
    ids, mask = render_conversation(tok, [{"role": "user", "content": "Use code."},
                                          {"role": "assistant", "content": reply}])
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "Let me compute. <|code_start|>(869 - 177*4) / 23<|code_end|> $7.<|im_end|>"
    assert tok.special_id("<|code_start|>") in ids and tok.special_id("<|output_start|>") in ids


message_text = st.lists(st.sampled_from(list("ab 12\n") + ["世", "<|im_end|>"]), max_size=12).map("".join)
tool_reply = st.lists(st.one_of(
    message_text,
    st.tuples(st.sampled_from(["code", "search"]), message_text, message_text).map(
        lambda t: f"<|{t[0]}_start|>{t[1]}<|{t[0]}_end|><|output_start|>{t[2]}<|output_end|>")),
    max_size=4).map("".join)


@given(st.lists(st.tuples(message_text, tool_reply), min_size=1, max_size=3), st.booleans())
def test_render_mask_covers_exactly_the_assistant_spans(unicode_tok, turns, with_system):
    """The trained tokens are, turn by turn, the assistant text and tool calls (outputs removed) and its
    closing <|im_end|>; nothing else."""
    tok = unicode_tok
    messages = [{"role": "system", "content": "Be brief."}] if with_system else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    ids, mask = render_conversation(tok, messages)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    expected = "".join(regex.sub(r"<\|output_start\|>.*?<\|output_end\|>", "", a, flags=regex.S) + "<|im_end|>"
                       for _, a in turns)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == expected
    assert tok.decode(ids).count("<|im_start|>") == len(messages)


@pytest.mark.parametrize("messages, problem", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "hi"}], "message 0: unknown role 'robot'"),
    ([{"role": "user", "content": ["hi"]}], "message 0 \\(user\\): content must be a string"),
    ([{"role": "user", "content": "x<|output_start|>7<|output_end|>"}], "only appear inside an assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}], "message 1: a system message"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<|code_start|>1+1"}],
     "message 1 \\(assistant\\): <\\|code_start\\|> is not closed"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "so <|output_start|>2<|output_end|>"}],
     "must directly follow a tool call"),
])
def test_malformed_conversations_are_rejected_clearly(unicode_tok, messages, problem):
    with pytest.raises(ValueError, match=problem):
        render_conversation(unicode_tok, messages)


def test_completion_must_end_with_user(unicode_tok):
    with pytest.raises(ValueError, match="must end with a user message"):
        render_for_completion(unicode_tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


# -- command line ------------------------------------------------------------------------------------

def test_cli_train_show_compare(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n\n" * 200)
    result = run_cli("tokenizer.py", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    tok_path = str(tmp_path / "tokenizer.json")
    shown = run_cli("tokenizer.py", "show", "the lazy  dog", "--tokenizer", tok_path, "--whitespace")
    assert shown.returncode == 0 and "Token count" in shown.stdout and "[·lazy]" in shown.stdout
    compared = run_cli("tokenizer.py", "compare", "the lazy dog" * 10, "--tokenizer", tok_path)
    assert compared.returncode == 0 and "bits:       960" in compared.stdout


@pytest.mark.parametrize("setup, args, problem", [
    ("empty", ["train", "--input", "{p}", "--vocab-size", "300"], "corpus is empty"),
    ("text", ["train", "--input", "{p}", "--vocab-size", "200"], "--vocab-size: 200 is below"),
    ("missing", ["train", "--input", "{p}", "--vocab-size", "300"], "cannot read training text"),
    ("binary", ["train", "--input", "{p}", "--vocab-size", "300"], "cannot read training text"),
    ("missing", ["show", "x", "--tokenizer", "{p}"], "no tokenizer at"),
])
def test_cli_bad_input_is_one_clear_line(tmp_path, setup, args, problem):
    path = tmp_path / "input.txt"
    if setup == "text":
        path.write_text("some text")
    elif setup == "empty":
        path.write_text("")
    elif setup == "binary":
        path.write_bytes(b"\xff\xfe\x00 not utf-8 \x80")
    out = ["--out", str(tmp_path / "out")] if args[0] == "train" else []
    result = run_cli("tokenizer.py", *[a.format(p=path) for a in args], *out)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and problem in lines[0] and "Traceback" not in result.stderr
