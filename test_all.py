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
import threading
import urllib.error
import urllib.request

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chat
import data
import tokenizer
import torch
import train_gpt
from chat import Engine, run_code
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


# ====================================================================================================
# chat.py


def test_code_tool_answers_the_lecture_examples():
    """SPEC X6/K4-K6: Emily's oranges, counting dots, every third letter."""
    assert run_code("(869 - 177*4) / 23") == "7.0"
    assert run_code("'.....'.count('.')") == "5"
    assert run_code("'ubiquitous'[::3]") == "uqts"
    assert run_code("'strawberry'.count('r')") == "3"
    assert run_code("12345678 * 87654321") == str(12345678 * 87654321)
    assert run_code("9.11 > 9.9") == "False"
    assert run_code("'Hello World'.lower().split()") == "['hello', 'world']"


HOSTILE_INPUTS = [
    "__import__('os').system('ls')", "().__class__.__bases__[0].__subclasses__()", "(1).__add__(2)",
    "open('/etc/passwd').read()", "eval('1+1')", "exec('x=1')", "globals()", "locals()", "getattr(1, 'real')",
    "lambda: 1", "(lambda x: x)(1)", "[x for x in range(10)]", "{x: 1 for x in 'ab'}", "{1, 2}", "{'a': 1}",
    "(x for x in 'ab')", "f'{1+1}'", "x", "print(1)", "9 ** 9 ** 9", "2 ** 100000", "10 ** 10 ** 10",
    "'a' * 10 ** 9", "[0] * 10 ** 8", "'ab'.replace('', 'x' * 60000)", "-" * 60 + "1", "[" * 100 + "]" * 100, "len(" * 60 + "'a'" + ")" * 60,
    "round(10 ** 100, -10 ** 9)", "int('9' * 5000)", "1 / 0", "'abc'[10]", "'a'.format(1)", "'a'.join(['b'])",
    "(yield 1)", "a := 1", "[*'abc']", "'%s' % 'x'", "1 if True else 2", "'x'.__len__()", "", "1 +", "1; 2",
    "import os", "sqrt(-1)", "max()", "int(float('inf'))", "'a' < 1", "len(5)", "1 < 0 < __import__('os')",
    "0 and open('x')",
]


@pytest.mark.parametrize("src", HOSTILE_INPUTS)
def test_code_tool_refuses_hostile_input_with_an_error_string(src):
    assert run_code(src).startswith("Error:")


SAFE_PARTS = ["1", "2.5", "'ab'", "len('abc')", "(3 - 1)", "'xyz'[1:]"]
FORBIDDEN_PARTS = ["__import__('os')", "().__class__", "(lambda: 0)()", "[c for c in 'ab']", "open('f')", "q",
                   "9 ** 9 ** 9", "'a' * 10 ** 9", "(1).real", "f'{1}'", "{1: 2}", "eval('1')", "2 ** 99999"]


@given(st.lists(st.sampled_from(SAFE_PARTS), max_size=3), st.sampled_from(FORBIDDEN_PARTS),
       st.sampled_from([" + ", " * ", " - ", ", "]), st.sampled_from(["{}", "len({})", "({})", "[{}][0]"]))
def test_code_tool_refuses_any_expression_with_a_forbidden_part(safe, forbidden, op, wrapper):
    parts = safe + [forbidden]
    src = wrapper.format(op.join(parts)) if op != ", " else f"max({', '.join(parts)})"
    result = run_code(src)
    assert isinstance(result, str) and result.startswith("Error:"), (src, result)


def tiny_model(vocab_size, seq_len=64, seed=0):
    """A random small GPT whose weights are scaled up so that its greedy choices are well separated."""
    torch.manual_seed(seed)
    config = train_gpt.GPTConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=2, n_embd=32, n_head=4, n_kv_head=2)
    model = train_gpt.GPT(config)
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.proj.weight, std=0.2)
        torch.nn.init.normal_(block.mlp.proj.weight, std=0.2)
    return model.eval()


class ScriptedModel(torch.nn.Module):
    """Stands in for a trained model: the k-th token it generates after the prompt is script[k] (then
    <|im_end|> forever), with certainty. It moves the KV cache's position like a real model. Where the
    engine forces tokens (tool outputs) the script must hold them too; the engine ignores those guesses."""

    def __init__(self, tok, text, seq_len=256):
        super().__init__()
        self.config = train_gpt.GPTConfig(vocab_size=tok.vocab_size, seq_len=seq_len)
        self.script = tok.encode(text, allowed_special="all")
        self.end = tok.special_id("<|im_end|>")
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the engine asks the parameters for device/dtype

    def forward(self, idx, targets=None, kv_cache=None):
        if kv_cache.pos == 0:  # the prefill: remember where the prompt ends
            self.prompt_width = idx.size(1)
        k = kv_cache.pos + idx.size(1) - self.prompt_width
        kv_cache.pos += idx.size(1)
        logits = torch.full((*idx.shape, self.config.vocab_size), -30.0)
        logits[:, :, self.script[k] if k < len(self.script) else self.end] = 30.0
        return logits, None


def byte_tok():
    return Tokenizer([])  # no merges: every byte its own token, the specials after them


def test_engine_kv_cache_equals_recompute_and_batches_equal_single_runs():
    tok = byte_tok()
    model = tiny_model(tok.vocab_size)
    engine = Engine(model, tok)
    prompts = [list(b"Hello there, model"), list(b"Hi"), list(b"A longer prompt of many bytes")]

    def recompute(prompt, steps):  # the naive loop: the whole sequence through the model every step
        seq, out = list(prompt), []
        for _ in range(steps):
            token = model(torch.tensor([seq]))[0][0, -1].argmax().item()
            out.append(token)
            seq.append(token)
            if token in engine.end_ids:
                break
        return out

    batched = engine.generate(prompts, n=2, max_tokens=25, temperature=0)
    assert [c.prompt_index for c in batched] == [0, 0, 1, 1, 2, 2]
    for completion in batched:
        prompt = prompts[completion.prompt_index]
        alone = engine.generate(prompt, n=1, max_tokens=25, temperature=0)[0]
        assert completion.tokens == alone.tokens == recompute(prompt, 25)
        assert completion.finish in ("stop", "length") and set(completion.sampled) == {1}


def test_engine_sampling_is_reproducible_by_seed():
    tok = byte_tok()
    engine = Engine(tiny_model(tok.vocab_size), tok)
    first = engine.generate([list(b"abc")], n=4, max_tokens=12, temperature=1.0, seed=7)
    again = engine.generate([list(b"abc")], n=4, max_tokens=12, temperature=1.0, seed=7)
    other = engine.generate([list(b"abc")], n=4, max_tokens=12, temperature=1.0, seed=8)
    assert [c.tokens for c in first] == [c.tokens for c in again]
    assert [c.tokens for c in first] != [c.tokens for c in other]
    assert len({tuple(c.tokens) for c in first}) > 1  # n samples of one prompt differ from each other


def test_engine_tool_call_inserts_the_output_and_masks_it():
    tok = byte_tok()
    reply = "Let me count.<|code_start|>'.....'.count('.')<|code_end|>"
    engine = Engine(ScriptedModel(tok, reply + "<|output_start|>?<|output_end|> There are 5.<|im_end|>"), tok)
    prompt = render_for_completion(tok, [{"role": "user", "content": "how many dots are here? ....."}])
    completion = engine.generate(prompt, max_tokens=100, temperature=0)[0]
    assert completion.finish == "stop"
    text = tok.decode(completion.tokens)  # the engine's "5" replaced the script's "?"
    assert text == reply + "<|output_start|>5<|output_end|> There are 5.<|im_end|>"
    forced = tok.decode([t for t, s in zip(completion.tokens, completion.sampled) if not s])
    assert forced == "<|output_start|>5<|output_end|>"
    events = list(engine.stream(prompt, max_tokens=100, temperature=0))
    assert {"type": "tool_call", "tool": "code", "query": "'.....'.count('.')"} in events
    assert {"type": "tool_result", "text": "5"} in events
    assert "".join(e["text"] for e in events if e["type"] == "text") == "Let me count. There are 5."
    # and the history renders back to exactly the tokens the model saw, with the output masked
    ids, mask = render_conversation(tok, [{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": chat.assistant_content(tok, completion)}])
    assert tok.decode(ids).endswith(text)


def test_search_tool_finds_the_passage_and_the_engine_pastes_it(tmp_path):
    (tmp_path / "zebra.txt").write_text("The zebra is a striped horse of Africa.\n\nIt lives on the plains.")
    (tmp_path / "other.md").write_text("Paris is the capital of France. The Eiffel tower stands there.")
    search = chat.Search(str(tmp_path))
    assert search.query("where does the zebra live", k=1)[0]["source"] == "zebra.txt"
    assert search.query("Eiffel tower", k=1)[0]["source"] == "other.md"
    assert search.query("xylophone") == []
    tok = byte_tok()
    engine = Engine(ScriptedModel(tok, "<|search_start|>Eiffel tower<|search_end|>", seq_len=400), tok, search=search)
    prompt = render_for_completion(tok, [{"role": "user", "content": "What stands in Paris?"}])
    results = [e for e in engine.stream(prompt, max_tokens=400, temperature=0) if e["type"] == "tool_result"]
    assert results and "[other.md] Paris is the capital" in results[0]["text"]


def test_split_valid_utf8_waits_for_the_rest_of_a_character():
    data = "é世".encode()
    assert chat.split_valid_utf8(data[:3]) == ("é", data[2:3])
    assert chat.split_valid_utf8(data) == ("é世", b"")
    assert chat.split_valid_utf8(b"\xff\xfeab")[0].endswith("ab")


@pytest.fixture
def api_server():
    """The web server on a free port, with a scripted model that answers "Hi! 2+2 = 4"."""
    tok = byte_tok()
    engine = Engine(ScriptedModel(tok, "Hi! 2+2 = 4<|im_end|>", seq_len=256), tok)
    cfg = chat.ChatConfig(host="127.0.0.1", port=0)
    server = chat.make_server(engine, cfg)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def post(url, body, headers=None):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_api_answers_the_openai_client_stream_and_not(api_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=api_server + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "What is 2+2?"}]
    answer = client.chat.completions.create(model="scratchgpt", messages=messages, max_tokens=50, temperature=0)
    assert answer.choices[0].message.content == "Hi! 2+2 = 4" and answer.choices[0].finish_reason == "stop"
    pieces = client.chat.completions.create(model="scratchgpt", messages=messages, stream=True, seed=3)
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == "Hi! 2+2 = 4"
    stopped = client.chat.completions.create(model="scratchgpt", messages=messages, stop=["2+2"])
    assert stopped.choices[0].message.content == "Hi! " and stopped.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model="scratchgpt", messages=messages, max_tokens=2)
    assert short.choices[0].message.content == "Hi" and short.choices[0].finish_reason == "length"
    assert [m.id for m in client.models.list().data] == ["scratchgpt"]


@pytest.mark.parametrize("body, problem", [
    (b"{not json", "not valid JSON"),
    (json.dumps({"messages": []}).encode(), "'messages' must be a list"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), "unknown role"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": 9}).encode(), "'temperature'"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}).encode(), "'max_tokens'"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 500}]}).encode(), "context window"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "stop": [1]}).encode(), "'stop'"),
])
def test_api_rejects_bad_requests_with_a_json_400(api_server, body, problem):
    status, reply = post(api_server + "/v1/chat/completions", body)
    assert status == 400 and problem in reply["error"]["message"]


def test_api_health_models_and_several_clients_at_once(api_server):
    with urllib.request.urlopen(api_server + "/health", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok"}
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    results = []
    threads = [threading.Thread(target=lambda: results.append(post(api_server + "/v1/chat/completions", body)))
               for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for status, _ in results] == [200] * 6
    assert {r["choices"][0]["message"]["content"] for _, r in results} == {"Hi! 2+2 = 4"}


def chromium_binary():
    return next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)), None)


def test_web_page_in_headless_chromium_shows_the_streamed_answer(api_server, tmp_path):
    """End to end: the browser loads the page, the page sends a question through its own UI code (the
    ?q= link), reads the streamed reply and puts it on the page."""
    binary = chromium_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium for this test (.ci/run does)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    result = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             f"--user-data-dir={tmp_path}",
                             "--virtual-time-budget=20000", "--dump-dom", api_server + "/?q=What%20is%202%2B2%3F"],
                            capture_output=True, text=True, timeout=120)
    assert 'class="user">What is 2+2?</div>' in result.stdout, result.stderr[-2000:]
    assert 'class="assistant" data-done="1">Hi! 2+2 = 4</div>' in result.stdout, result.stdout[-2000:]


def test_chat_cli_without_a_checkpoint_says_what_to_run(tmp_path):
    result = run_cli(os.path.join(HERE, "chat.py"), "-p", "hello", cwd=tmp_path)
    assert result.returncode == 2 and "no chat checkpoint under out/ yet: run python sft.py" in result.stderr
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    result = run_cli(os.path.join(HERE, "chat.py"), "--checkpoint", str(broken), "-p", "hi", cwd=tmp_path)
    assert result.returncode == 2 and "not a readable scratchgpt checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A random tiny model saved as out/sft/model.pt in a scratch folder (the CLI finds it there)."""
    folder = tmp_path_factory.mktemp("chatcli")
    tok = byte_tok()
    train_gpt.save_checkpoint(str(folder / "out" / "sft" / "model.pt"), tiny_model(tok.vocab_size, seq_len=128), tok,
                              step=0, config={}, stage="sft")
    return folder


def test_chat_cli_answers_once_and_chats(chat_checkpoint):
    once = run_cli(os.path.join(HERE, "chat.py"), "-p", "What is 2+2?", "--max-tokens", "8", "--seed", "1",
                   "--system", "Be brief.", cwd=chat_checkpoint)
    assert once.returncode == 0, once.stderr
    session = subprocess.run([sys.executable, os.path.join(HERE, "chat.py"), "--max-tokens", "5", "--system", "Be brief."],
                             input="hi\n/tokens\n/temp 0\n/resample\n/clear\n/quit\n", cwd=chat_checkpoint,
                             capture_output=True, text=True, timeout=120)
    assert session.returncode == 0, session.stderr
    assert "Token count" in session.stdout and "<|im_start|>" in session.stdout and "commands:" in session.stdout
    too_long = run_cli(os.path.join(HERE, "chat.py"), "-p", "why " * 200, cwd=chat_checkpoint)
    assert too_long.returncode == 2 and "context window holds 128" in too_long.stderr


def test_chat_cli_base_mode_samples_and_traces(chat_checkpoint):
    path = str(chat_checkpoint / "out" / "sft" / "model.pt")
    samples = run_cli(os.path.join(HERE, "chat.py"), "--checkpoint", path, "--base", "Once upon", "-n", "2",
                      "--max-tokens", "6")
    assert samples.returncode == 0, samples.stderr
    assert "--- sample 2 of 2 ---" in samples.stdout and samples.stdout.count("Once upon") == 2
    trace = run_cli(os.path.join(HERE, "chat.py"), "--checkpoint", path, "--base", "The", "--probs", "--max-tokens", "3")
    assert trace.returncode == 0 and trace.stdout.count("-> picked") == 3 and "%" in trace.stdout
