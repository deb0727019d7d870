"""
test_all.py -- properties and end-to-end checks of every stage (pytest + hypothesis).

    python -m pytest -q test_all.py            # everything but the slow marks
    python -m pytest -q test_all.py -m slow    # the slow ones

Tests never touch the network (a download test talks to a server it starts on 127.0.0.1) and never read
outside the repository.
"""
import collections
import glob
import hashlib
import http.server
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chat
import data
import rl
import rlhf
import sft
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
# data.py


# ----------------------------------------------------------------------------------------------------
# A local file server that misbehaves on request: the first path component picks the fault.
#   /ok/NAME          serves the file (HEAD/GET, Range requests, HF-style X-Linked-Size/X-Linked-Etag)
#   /drop/NAME        first GET: promises the whole file, sends half, hangs up
#   /busy/NAME        the first 3 GETs answer 503
#   /cut-once/NAME    first GET: no Content-Length, half the body, then EOF (looks complete on the wire)
#   /cut/NAME         every GET does that
#   /corrupt-once/NAME  first GET: right length, wrong bytes
#   /slow-once/NAME   first GET: says nothing for a second
#   anything missing  404


class FaultyFileHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    root = None       # folder served; set per server
    log = None        # list of (method, path, range header); set per server
    gets = None       # path -> number of GETs so far

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        self.log.append(("GET", self.path, self.headers.get("Range")))
        self.gets[self.path] = n = self.gets.get(self.path, 0) + 1
        fault, _, name = self.path.lstrip("/").partition("/")
        path = os.path.join(self.root, name)
        if not name or not os.path.isfile(path):
            return self.reply_status(404)
        if fault == "busy" and n <= 3:
            return self.reply_status(503)
        if fault == "slow-once" and n == 1:
            time.sleep(1.0)  # longer than the client's timeout
        with open(path, "rb") as f:
            body = f.read()
        start = int(re.match(r"bytes=(\d+)-", self.headers["Range"]).group(1)) if self.headers.get("Range") else 0
        part = body[start:]
        if fault == "corrupt-once" and n == 1:
            part = bytes(b ^ 0xFF for b in part)
        self.send_response(206 if start else 200)
        self.send_header("X-Linked-Size", str(len(body)))
        self.send_header("X-Linked-Etag", '"%s"' % hashlib.sha256(body).hexdigest())
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        if (fault == "cut-once" and n == 1) or fault == "cut":
            self.send_header("Connection", "close")  # no length: the body ends where the connection does
            self.end_headers()
            self.wfile.write(part[:len(part) // 2])
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        if fault == "drop" and n == 1:
            self.wfile.write(part[:len(part) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(part)

    def reply_status(self, code):
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def server(tmp_path):
    """(base URL, served folder, request log) of a fresh server on 127.0.0.1 with a few files in it."""
    root = tmp_path / "served"
    root.mkdir()
    rng = np.random.default_rng(0)
    (root / "shard.bin").write_bytes(rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes())
    (root / "stories.txt").write_text("Once upon a time there was a cat.\n<|endoftext|>\nThe end.\n" * 50)
    write_parquet(root / "docs.parquet", [f"document number {i} " * 20 for i in range(30)])
    handler = type("Handler", (FaultyFileHandler,), {"root": str(root), "log": [], "gets": {}})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, handler.log
    httpd.shutdown()
    httpd.server_close()


def write_parquet(path, texts):
    table = pa.table({"text": texts, "id": [f"doc-{i}" for i in range(len(texts))],
                      "url": [f"https://example.org/{i}" for i in range(len(texts))]})
    pq.write_table(table, path)


def fast_download(url, dest):
    return data.download(url, str(dest), retries=4, backoff=0.01, timeout=5)


def test_download_clean(server, tmp_path):
    base, root, log = server
    dest = fast_download(f"{base}/ok/docs.parquet", tmp_path / "out" / "docs.parquet")
    assert open(dest, "rb").read() == (root / "docs.parquet").read_bytes()
    assert not os.path.exists(dest + ".part")


@pytest.mark.parametrize("fault", ["drop", "cut-once"])
def test_download_resumes_after_a_broken_transfer(server, tmp_path, fault):
    base, root, log = server
    dest = fast_download(f"{base}/{fault}/shard.bin", tmp_path / "shard.bin")
    assert open(dest, "rb").read() == (root / "shard.bin").read_bytes()
    ranges = [r for method, path, r in log if path == f"/{fault}/shard.bin"]
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", ranges[1]).group(1))
    assert ranges[0] is None and 0 < resumed_at <= 150_000  # the second request asked only for the rest


def test_download_retries_a_burst_of_503(server, tmp_path):
    base, root, log = server
    dest = fast_download(f"{base}/busy/stories.txt", tmp_path / "stories.txt")
    assert open(dest, "rb").read() == (root / "stories.txt").read_bytes()
    assert len(log) == 4


def test_download_retries_after_a_timeout(server, tmp_path):
    base, root, log = server
    dest = data.download(f"{base}/slow-once/stories.txt", str(tmp_path / "stories.txt"), backoff=0.01, timeout=0.3)
    assert open(dest, "rb").read() == (root / "stories.txt").read_bytes()
    assert len(log) == 2


def test_download_throws_away_bytes_with_a_wrong_checksum(server, tmp_path):
    base, root, log = server
    dest = fast_download(f"{base}/corrupt-once/shard.bin", tmp_path / "shard.bin")
    assert open(dest, "rb").read() == (root / "shard.bin").read_bytes()
    assert [r for _, _, r in log] == [None, None]  # bad bytes are not resumed from: start over


def test_download_that_stays_truncated_never_reaches_its_final_name(server, tmp_path):
    base, root, log = server
    with pytest.raises(data.DataError, match="download failed after 5 attempts"):
        fast_download(f"{base}/cut/shard.bin", tmp_path / "shard.bin")
    assert not os.path.exists(tmp_path / "shard.bin")


def test_download_404_is_a_clear_error_without_retries(server, tmp_path):
    base, root, log = server
    with pytest.raises(data.DataError, match=r"/ok/missing\.parquet: HTTP 404"):
        fast_download(f"{base}/ok/missing.parquet", tmp_path / "missing.parquet")
    assert len(log) == 1
    assert os.listdir(tmp_path) == ["served"]


def test_download_many_in_parallel(server, tmp_path):
    base, root, log = server
    names = ["shard.bin", "stories.txt", "docs.parquet"]
    paths = data.download_many([f"{base}/drop/{n}" for n in names], str(tmp_path / "dl"), workers=3,
                               backoff=0.01, timeout=5)
    for name, path in zip(names, paths):
        assert open(path, "rb").read() == (root / name).read_bytes()


def test_download_many_stops_starting_downloads_after_a_failure(server, tmp_path):
    base, root, log = server
    urls = [f"{base}/ok/missing.bin"] + [f"{base}/ok/shard.bin?copy={i}" for i in range(5)]
    with pytest.raises(data.DataError, match="HTTP 404"):
        data.download_many(urls, str(tmp_path / "dl"), workers=1, backoff=0.01, timeout=5)
    assert len(log) <= 2  # the failing one, and at most the one already running


def test_download_cli_404_exits_2_with_one_line(server, tmp_path):
    base, root, log = server
    command = [sys.executable, "data.py", "download", f"{base}/ok/nope.bin", "--out", str(tmp_path / "x")]
    proc = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope.bin: HTTP 404" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------------
# The filters: each one drops a document it must drop and keeps one it must keep.

PROSE = ("The river rises in the hills to the north of the town and flows for about forty miles before it "
         "reaches the sea. In the spring the water is high and fast, and the old mill by the bridge still "
         "turns its wheel for visitors who come to see how flour was made. Children swim in the shallow pools "
         "near the church in the summer, while their parents sit on the bank and watch the boats go by. "
         "Many birds nest in the reeds, and the local school counts them every year with the help of the "
         "people who live along the water. Nobody remembers a year without them.")
OTHER_PROSE = ("Bread is one of the oldest prepared foods. A baker mixes flour, water, salt and yeast, and then "
               "leaves the dough to rise for several hours in a warm place. The yeast eats some of the sugar in "
               "the flour and releases small bubbles of gas, which make the bread light. After shaping, the loaf "
               "goes into a hot oven, where the crust turns brown and the kitchen fills with a good smell. Many "
               "families still bake their own bread at the weekend, because it is cheap and easy to learn.")
FRENCH = ("La rivière prend sa source dans les collines au nord de la ville et coule pendant une soixantaine de "
          "kilomètres avant d'atteindre la mer. Au printemps, l'eau est haute et rapide, et le vieux moulin "
          "près du pont fait encore tourner sa roue pour les visiteurs qui viennent voir comment on faisait "
          "la farine. Les enfants se baignent dans les bassins peu profonds près de l'église pendant l'été.")
GERMAN = ("Der Fluss entspringt in den Hügeln nördlich der Stadt und fließt etwa sechzig Kilometer, bevor er "
          "das Meer erreicht. Im Frühling ist das Wasser hoch und schnell, und die alte Mühle an der Brücke "
          "dreht noch immer ihr Rad für die Besucher, die sehen wollen, wie man früher Mehl gemacht hat.")


def text_doc(text, **extra):
    return {"text": text, "id": "test", "file_path": "test", **extra}


def test_url_filter():
    blocklist = {"bad-casino.example"}
    assert data.url_filter(text_doc(PROSE, url="https://www.bad-casino.example/win"), blocklist)
    assert data.url_filter(text_doc(PROSE, url="https://example.org/free-porn-videos"), blocklist)
    assert data.url_filter(text_doc(PROSE, url="https://library.example.org/rivers"), blocklist) is None
    assert data.url_filter(text_doc(PROSE), blocklist) is None  # a local document has no URL to judge


def test_shipped_blocklist_loads_and_blocks():
    blocklist = data.load_list([os.path.join(HERE, "data", "url_blocklist.txt")], "--blocklist")
    assert "mega-jackpot-slots.example" in blocklist and not any(d.startswith("#") for d in blocklist)


def test_extract_text_keeps_the_article_and_drops_the_furniture():
    page = ("<html><head><title>T</title><style>p {color: red}</style><script>var x = 1;</script></head><body>"
            "<header>Site name</header><nav><a href='/'>Home</a></nav><div class='cookie-banner'>We use cookies</div>"
            f"<main><h1>Rivers</h1><p>{PROSE}</p><p>Second &amp; last paragraph.</p></main>"
            "<aside>Related links</aside><div id='ad-top'>Buy now</div><footer>Copyright</footer>"
            "<script>track()</script></body></html>")
    d = {"html": page, "id": "x", "file_path": "x"}
    assert data.extract_text(d) is None
    assert d["text"] == f"Rivers\n{PROSE}\nSecond & last paragraph."
    for junk in ("Site name", "Home", "cookies", "Related", "Buy now", "Copyright", "var x", "color", "track"):
        assert junk not in d["text"]
    sloppy = {"html": f"<nav><ul><li>Home<li>About</ul></nav><p>{PROSE}", "file_path": "z"}  # unclosed tags
    assert data.extract_text(sloppy) is None and sloppy["text"] == PROSE
    empty = {"html": "<html><body><nav>Home | About</nav><script>x()</script></body></html>", "file_path": "y"}
    assert data.extract_text(empty) == "no text left after removing the markup"


HTML_WORDS = st.text("abcdefghij klmnop", min_size=1, max_size=40).map(str.strip).filter(bool)


@settings(max_examples=40, deadline=None)
@given(st.lists(HTML_WORDS, min_size=1, max_size=5), HTML_WORDS, st.sampled_from(sorted(data.SKIP_TAGS - {"head"})))
def test_extract_text_keeps_paragraphs_and_never_leaks_skipped_elements(paragraphs, hidden, tag):
    page = "".join(f"<p>{p}</p><{tag}><div>SECRET {hidden}</div></{tag}>" for p in paragraphs)
    d = {"html": f"<html><body>{page}</body></html>", "file_path": "p"}
    data.extract_text(d)
    assert d["text"].split("\n") == [" ".join(p.split()) for p in paragraphs]


def test_language_filter_keeps_english_and_stores_its_score():
    d = text_doc(PROSE)
    assert data.language_filter(d) is None
    assert d["language"] == "en" and d["language_score"] >= data.MIN_ENGLISH_SCORE


@pytest.mark.parametrize("text, language", [(FRENCH, "fr"), (GERMAN, "de")])
def test_language_filter_drops_other_languages(text, language):
    d = text_doc(text)
    assert data.language_filter(d) is not None
    assert d["language"] == language


def test_language_filter_drops_english_words_that_are_not_prose():
    d = text_doc("#summer #beach #travel #family #dog #sunset #ocean #holiday #vacation #fun #happy #love " * 5
            + "the beach")
    assert data.language_filter(d) is not None and d["language_score"] < data.MIN_ENGLISH_SCORE


def test_gopher_repetition_filter():
    assert data.gopher_repetition_filter(text_doc(PROSE)) is None
    assert "lines are repeats" in data.gopher_repetition_filter(text_doc(PROSE + "\nBuy cheap watches now.\n" * 5))
    spam = " ".join(["cheap watches best price"] * 30)  # one line, so only the n-gram rules can catch it
    assert "gram" in data.gopher_repetition_filter(text_doc(spam))


def repeated_ngram_fractions_by_hand(words, n):
    """The Gopher n-gram statistics the slow, obvious way: tuples of words and a Counter."""
    total = sum(map(len, words))
    grams = list(zip(*(words[i:] for i in range(n))))
    counts = collections.Counter(grams)
    best = max(counts.values())
    top = max(best * sum(map(len, g)) for g, c in counts.items() if c == best) / total if best > 1 else 0.0
    covered = set()
    for start, gram in enumerate(grams):
        if counts[gram] > 1:
            covered |= set(range(start, start + n))
    return top, sum(len(words[i]) for i in covered) / total


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["a", "bb", "ccc", "the", "river", "x"]), min_size=10, max_size=80),
       st.integers(2, 10))
def test_numpy_ngram_statistics_match_the_obvious_computation(words, n):
    vocab = {}
    ids = np.array([vocab.setdefault(w, len(vocab)) for w in words], dtype=np.uint64)
    lens = np.array([len(w) for w in words])
    top, duplicated = repeated_ngram_fractions_by_hand(words, n)
    assert data.top_ngram_char_fraction(ids, lens, n, lens.sum()) == pytest.approx(top)
    assert data.duplicate_ngram_char_fraction(ids, lens, n, lens.sum()) == pytest.approx(duplicated)


def test_gopher_quality_filter():
    assert data.gopher_quality_filter(text_doc(PROSE)) is None
    assert "words" in data.gopher_quality_filter(text_doc("Home. Shop. Cart. Help."))
    assert "symbols" in data.gopher_quality_filter(text_doc(PROSE + " #tag" * 20))
    assert "ellipsis" in data.gopher_quality_filter(text_doc("\n".join([PROSE[:120] + "..."] * 5)))
    assert "stop words" in data.gopher_quality_filter(text_doc(" ".join(["lorem", "ipsum", "dolor", "amet"] * 20)))


def test_c4_filter_keeps_sentences_and_drops_code_and_placeholders():
    d = text_doc(f"Home\nMenu | Shop | Cart\n{PROSE}\nClick here to accept our privacy policy.")
    assert data.c4_filter(d) is None
    assert d["text"] == PROSE  # the navigation lines and the policy line are gone
    assert "lorem" in data.c4_filter(text_doc(PROSE + "\nLorem ipsum dolor sit amet, consectetur."))
    assert "curly" in data.c4_filter(text_doc(PROSE + "\nfunction f() { return 1; }"))
    assert "sentences" in data.c4_filter(text_doc("A short page. With two sentences."))


def test_exclusion_filter_matches_whole_words_only(tmp_path):
    (tmp_path / "ex.txt").write_text("# topics we leave out\nMill\nold bridge\n")
    pattern = data.exclusion_pattern(data.load_list([str(tmp_path / "ex.txt")], "--exclude"))
    assert data.exclusion_filter(text_doc(PROSE), pattern) == "contains the excluded phrase 'mill'"
    assert data.exclusion_filter(text_doc("The miller's old bridges."), pattern) is None
    assert data.exclusion_filter(text_doc(PROSE), None) is None


def shingles(text):
    words = text.lower().split()
    return {" ".join(words[i:i + data.SHINGLE_WORDS]) for i in range(len(words) - data.SHINGLE_WORDS + 1)}


def jaccard(a, b):
    return len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))


def test_minhash_drops_a_near_duplicate_and_keeps_a_distinct_document():
    long_text = " ".join(f"{PROSE} Chapter {i} ends here." for i in range(6))
    near = long_text.replace("old mill", "ancient mill", 1)
    assert jaccard(long_text, near) >= 0.8
    other = " ".join(f"{PROSE[::-1]} Part {i}." for i in range(6))
    dedup = data.MinHashDeduplicator()
    assert dedup({"id": "a", "text": long_text}) is None
    assert "near-duplicate of a" in dedup({"id": "b", "text": near})
    assert dedup({"id": "c", "text": other}) is None
    assert dedup.clusters == {"a": ["b"]}


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2 ** 31))
def test_minhash_signature_agreement_estimates_jaccard(seed):
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(400)]
    a = list(rng.choice(vocab, 300))
    b = a[:150] + list(rng.choice(vocab, 150))
    dedup = data.MinHashDeduplicator()
    estimate = np.mean(dedup.signature(" ".join(a)) == dedup.signature(" ".join(b)))
    assert abs(estimate - jaccard(" ".join(a), " ".join(b))) < 0.2  # 100 hashes: std ~ 0.05


EMAILS = st.from_regex(r"[a-z][a-z0-9._]{0,10}@[a-z][a-z0-9-]{0,8}\.(com|org|co\.uk|example)", fullmatch=True)
PHONES = st.sampled_from(["(555) 201-3344", "555-201-3344", "555.201.3344", "+1 555 201 3344",
                          "+44 20 7946 0958", "+33 1 42 68 53 00"])
IPS = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
IDS = st.tuples(st.integers(100, 899), st.integers(10, 99), st.integers(1000, 9999)).map(lambda t: "%d-%d-%d" % t)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(EMAILS, PHONES, IPS, IDS), min_size=1, max_size=6))
def test_pii_placeholders_replace_every_planted_item(items):
    text = " ".join(f"Contact {item} today, said the note from 2024." for item in items)
    redacted = data.redact_pii(text)
    for item in items:
        assert item not in redacted
    assert len(re.findall(r"<(EMAIL|PHONE|IP_ADDRESS|ID_NUMBER)>", redacted)) == len(items)
    assert "from 2024." in redacted  # ordinary numbers stay


def test_pii_filter_keeps_the_document():
    d = text_doc("Write to ada@example.org from 10.0.0.1 or call 555-201-3344.")
    assert data.pii_filter(d) is None
    assert d["text"] == "Write to <EMAIL> from <IP_ADDRESS> or call <PHONE>."


# ----------------------------------------------------------------------------------------------------
# The funnel over the committed web sample, and the bad inputs.

@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A small BPE tokenizer trained in well under a second: enough for token counts and shards."""
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    text = (PROSE + "\n" + FRENCH + "\n") * 3
    Tokenizer.train(iter([text]), 256 + 40 + 16).save(path)
    return path


def test_process_web_sample_funnel(tiny_tokenizer, tmp_path, capsys):
    stats = data.process([data.WEB_SAMPLE_GLOB], str(tmp_path), [os.path.join(HERE, "data", "url_blocklist.txt")],
                         tiny_tokenizer)
    names = list(stats)
    for before, after in zip(names, names[1:]):  # what one filter keeps is what the next one sees
        assert stats[after]["in"] == stats[before]["in"] - stats[before]["removed"]
    for name in ("url_blocklist", "text_extraction", "language", "gopher_repetition", "gopher_quality",
                 "minhash_dedup", "c4_lines"):
        assert stats[name]["removed"] >= 1, name  # the sample has something for every dropping filter
    assert stats["pii_redaction"]["edited"] >= 1
    rows = [json.loads(line) for line in open(tmp_path / "kept.jsonl")]
    assert rows and all(tuple(r) == data.FINEWEB_COLUMNS for r in rows)
    assert all(r["language"] == "en" and r["language_score"] >= 0.65 and r["token_count"] > 0 for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    text = "\n".join(r["text"] for r in rows)
    assert "@" not in text and "<EMAIL>" in text and "cookies" not in text
    out = capsys.readouterr().out
    assert "minhash_dedup" in out and "dataset-viewer" in out


def test_process_reads_parquet_jsonl_and_txt(tiny_tokenizer, tmp_path):
    write_parquet(tmp_path / "a.parquet", [PROSE, PROSE, FRENCH])
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": OTHER_PROSE, "url": "https://x.org/bread"}) + "\n")
    (tmp_path / "c.txt").write_text(PROSE.upper() + "\n<|endoftext|>\n" + GERMAN)
    stats = data.process([str(tmp_path / "a.parquet"), str(tmp_path / "b.jsonl"), str(tmp_path / "c.txt")],
                         str(tmp_path / "out"), [], tiny_tokenizer)
    assert stats["url_blocklist"]["in"] == 6
    assert stats["language"]["removed"] == 2  # the French and the German document
    assert stats["minhash_dedup"]["removed"] == 2  # the repeated parquet row, and the upper-case copy
    rows = [json.loads(line) for line in open(tmp_path / "out" / "kept.jsonl")]
    assert [r["url"] for r in rows] == ["https://example.org/0", "https://x.org/bread"]
    assert rows[0]["id"] == "doc-0"  # the source's own columns survive


def run_data_main(*args):
    """data.main in-process: (exit code, stderr) -- for the error paths, faster than a subprocess."""
    with pytest.raises(SystemExit) as exit_info:
        data.main(list(args))
    return exit_info.value.code


@pytest.mark.parametrize("make_input, expected", [
    (lambda d: str(d / "missing.jsonl"), r"missing\.jsonl: no such file"),
    (lambda d: (d / "bad.parquet").write_bytes(b"PAR1 this is not parquet") and str(d / "bad.parquet"),
     r"bad\.parquet: not a readable parquet file"),
    (lambda d: (d / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n') and str(d / "bad.jsonl"),
     r"bad\.jsonl:2: expected a JSON object"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tiny_tokenizer, tmp_path, capsys, make_input, expected):
    path = make_input(tmp_path)
    out = tmp_path / "out"
    code = run_data_main("process", "--input", path, "--out", str(out), "--tokenizer", tiny_tokenizer)
    err = capsys.readouterr().err
    assert code == 2 and re.search(expected, err) and err.count("\n") == 1
    assert not out.exists() or os.listdir(out) == []
    code = run_data_main("tokenize", "--input", path, "--name", "x", "--out", str(out), "--tokenizer", tiny_tokenizer)
    assert code == 2 and re.search(expected, capsys.readouterr().err)
    assert not os.path.exists(out / "x" / "meta.json")
    assert not any(".tmp-" in f for _, _, files in os.walk(out) for f in files)


def test_cli_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "data.py", "process", "--input", str(tmp_path / "nope.txt"),
                           "--out", str(tmp_path / "o")], cwd=HERE, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------------
# Shards and the loader

SHARD_DOCS = [PROSE, FRENCH, GERMAN, "Short one.", PROSE.upper()]


def test_shards_hold_the_documents_each_after_endoftext(tiny_tokenizer, tmp_path):
    tok = Tokenizer.load(tiny_tokenizer)
    meta = data.tokenize_to_shards({"train": SHARD_DOCS}, "t", tiny_tokenizer, str(tmp_path), processes=2,
                                   shard_tokens=300)
    paths = sorted((tmp_path / "t").glob("t_train_*.bin"))
    assert meta["splits"]["train"]["shards"] == len(paths) > 1  # small shards: the stream spans several files
    header = np.fromfile(paths[0], dtype=np.int32, count=256)
    assert list(header[:3]) == [20240520, 1, 300] and not header[3:].any()
    stream = np.concatenate([data.read_shard(str(p)) for p in paths]).tolist()
    expected = []
    for text in SHARD_DOCS:
        expected += [tok.special_id("<|endoftext|>")] + tok.encode(text)
    assert stream == expected and meta["splits"]["train"]["tokens"] == len(expected)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=60), min_size=1, max_size=6), st.integers(5, 40))
def test_shard_stream_decodes_to_the_documents(tiny_tokenizer, tmp_path_factory, texts, shard_tokens):
    out = tmp_path_factory.mktemp("roundtrip")
    data.tokenize_to_shards({"train": texts}, "r", tiny_tokenizer, str(out), 1, shard_tokens)
    stream = data.DataLoader(str(out / "r" / "r_train_*.bin"), 1, 1)
    decoded = Tokenizer.load(tiny_tokenizer).decode(stream.tokens(0, stream.total).tolist())
    assert decoded == "".join("<|endoftext|>" + t for t in texts)


def test_tokenize_command_on_parquet_input(tiny_tokenizer, tmp_path, capsys):
    write_parquet(tmp_path / "docs.parquet", [PROSE, FRENCH, GERMAN])
    data.main(["tokenize", "--input", str(tmp_path / "docs.parquet"), "--name", "pq", "--out", str(tmp_path),
               "--tokenizer", tiny_tokenizer, "--processes", "2"])
    meta = json.loads((tmp_path / "pq" / "meta.json").read_text())
    tok = Tokenizer.load(tiny_tokenizer)
    assert meta["splits"]["val"]["tokens"] == 1 + len(tok.encode(PROSE))  # the first document is held out
    assert meta["splits"]["train"]["tokens"] == 2 + len(tok.encode(FRENCH)) + len(tok.encode(GERMAN))
    out = capsys.readouterr().out
    assert "first 48 token ids: [" in out and "MB/s" in out


def test_one_and_two_processes_write_identical_shards(tiny_tokenizer, tmp_path):
    for processes in (1, 2):
        data.tokenize_to_shards({"train": SHARD_DOCS * 4}, f"p{processes}", tiny_tokenizer, str(tmp_path), processes)
    one, two = (tmp_path / f"p{p}" / f"p{p}_train_000000.bin" for p in (1, 2))
    assert one.read_bytes() == two.read_bytes()


def test_truncated_shard_is_rejected(tmp_path):
    path = str(tmp_path / "s.bin")
    data.write_shard(path, np.arange(100))
    with open(path, "r+b") as f:
        f.truncate(1024 + 50)
    with pytest.raises(data.DataError, match="truncated"):
        data.read_shard(path)


def counting_shards(tmp_path, n, per_shard):
    """Shards whose tokens are 0, 1, 2, ... so every token says where in the stream it came from."""
    tokens = np.arange(n)
    for i, start in enumerate(range(0, n, per_shard)):
        data.write_shard(str(tmp_path / f"c_train_{i:06d}.bin"), tokens[start:start + per_shard])
    return str(tmp_path / "c_train_*.bin")


def test_loader_ranks_are_disjoint_and_cover_the_stream(tmp_path):
    pattern = counting_shards(tmp_path, 1000, 170)  # 6 shards, windows straddle their borders
    B, T, world = 2, 8, 2
    loaders = [data.DataLoader(pattern, B, T, rank, world) for rank in range(world)]
    steps = (1000 - 1) // (world * B * T)
    seen = []
    for _ in range(steps):
        for loader in loaders:
            x, y = loader.next_batch()
            assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
            assert torch.equal(y, x + 1)  # the target is the next token
            seen.append(x.flatten())
    seen = torch.cat(seen).tolist()
    assert len(set(seen)) == len(seen)  # no token position served twice within the epoch
    assert sorted(seen) == list(range(steps * world * B * T))  # ...and together the ranks walk the stream
    assert all(loader.epoch == 1 for loader in loaders)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 40), st.integers(1, 3), st.integers(1, 2))
def test_loader_resume_reproduces_the_uninterrupted_sequence(tmp_path_factory, stop_at, B, world):
    pattern = counting_shards(tmp_path_factory.mktemp("resume"), 300, 64)  # small: the run wraps epochs
    T, rank, total = 7, world - 1, 45
    straight = data.DataLoader(pattern, B, T, rank, world)
    expected = [straight.next_batch() for _ in range(total)]
    first = data.DataLoader(pattern, B, T, rank, world)
    for _ in range(stop_at):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # it must survive a checkpoint round trip
    resumed = data.DataLoader(pattern, B, T, rank, world)
    resumed.load_state_dict(state)
    for x_expected, y_expected in expected[stop_at:]:
        x, y = resumed.next_batch()
        assert torch.equal(x, x_expected) and torch.equal(y, y_expected)


def test_loader_errors(tmp_path):
    with pytest.raises(data.DataError, match="no token shards"):
        data.DataLoader(str(tmp_path / "none_*.bin"), 1, 4)
    pattern = counting_shards(tmp_path, 20, 20)
    with pytest.raises(data.DataError, match="cannot fill one step"):
        data.DataLoader(pattern, 4, 8)
    with pytest.raises(data.DataError, match="rank 2 is outside"):
        data.DataLoader(pattern, 1, 4, rank=2, world=2)


def test_prepare_default_builds_once_and_feeds_the_loader(tmp_path, monkeypatch):
    small = {"train": [PROSE, FRENCH, GERMAN] * 3, "val": [PROSE.upper()]}
    monkeypatch.setattr(data, "embedded_documents", lambda split="train": iter(small[split]))
    paths = data.prepare_default(str(tmp_path), vocab_size=302)
    assert os.path.exists(paths["tokenizer"])
    shard = sorted(glob.glob(paths["train"]))[0]
    mtime = os.path.getmtime(shard)
    assert data.prepare_default(str(tmp_path), vocab_size=302) == paths
    assert os.path.getmtime(shard) == mtime  # the second call found everything in place
    with pytest.raises(data.DataError, match="holds a tokenizer with vocab 302, not 400"):
        data.prepare_default(str(tmp_path), vocab_size=400)
    x, y = data.DataLoader(paths["val"], 2, 16, 0, 1).next_batch()
    assert x[0, 0].item() == Tokenizer.load(paths["tokenizer"]).special_id("<|endoftext|>")


def test_embedded_corpus_is_english_and_split():
    train, val = list(data.embedded_documents("train")), list(data.embedded_documents("val"))
    assert len(train) > 40 and len(val) == 2 and not set(train) & set(val)
    lang, score = data.language_score(val[0][:20000])
    assert lang == "en" and score >= 0.65


# ====================================================================================================
# train_gpt.py


def tiny_gpt(seed=0, **over):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, seq_len=32, n_layer=2, n_embd=32, n_head=4, n_kv_head=2)
    cfg.update(over)
    model = train_gpt.GPT(train_gpt.GPTConfig(**cfg))
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
    cache = train_gpt.KVCache(model.config, 2, "cpu")
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
    return train_gpt.TrainConfig(**{**dict(matrix_lr=0.05, embed_lr=0.05, head_lr=0.02, warmup_steps=0,
                                    warmdown_frac=0.0), **over})


def test_one_step_raises_probability_of_the_true_next_token():
    model = tiny_gpt()
    x, y = torch.randint(0, 97, (1, 8)), torch.randint(0, 97, (1, 8))
    p_before = model(x)[0].softmax(-1)[0, -1, y[0, -1]]
    optimizers = train_gpt.build_optimizers(model, optim_cfg(), "cpu")
    model(x, y)[1].backward()
    for o in optimizers:
        o.step()
    assert model(x)[0].softmax(-1)[0, -1, y[0, -1]] > p_before


def test_a_few_steps_overfit_a_tiny_batch():
    model = tiny_gpt()
    model.init_weights()  # the real initialisation, zero output projections included
    optimizers = train_gpt.build_optimizers(model, optim_cfg(), "cpu")
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
        s = torch.linalg.svdvals(train_gpt.orthogonalize(g))
        assert s.min() > 0.5 and s.max() < 1.3, s  # from a 100x spread to roughly 1


def test_lr_schedule_warmup_constant_warmdown():
    f = [train_gpt.lr_multiplier(s, 100, 10, 0.4, 0.1) for s in range(100)]
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
    assert {train_gpt.sample_next(logits, top_k=2, generator=g).item() for _ in range(200)} == {0, 1}
    assert {train_gpt.sample_next(logits, top_p=0.75, generator=g).item() for _ in range(200)} == {0, 1}
    assert train_gpt.sample_next(logits, temperature=0).item() == 0


def test_autocast_code_path_runs_in_bfloat16_on_cpu():
    rt = train_gpt.Runtime(torch.device("cpu"), torch.bfloat16)
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
    cfg = train_gpt.parse_config(train_gpt.TrainConfig, ["--preset", "d12", "--num-steps", "7", "--no-resume"], train_gpt.PRESETS)
    assert cfg.depth == 12 and cfg.n_embd == 768 and cfg.num_steps == 7 and cfg.resume is False
    assert train_gpt.parse_config(train_gpt.TrainConfig, [], train_gpt.PRESETS) == train_gpt.TrainConfig()
    with pytest.raises(train_gpt.UserError, match="unknown preset 'huge'"):
        train_gpt.parse_config(train_gpt.TrainConfig, ["--preset", "huge"], train_gpt.PRESETS)
    with pytest.raises(train_gpt.UserError, match="--num-steps"):
        train_gpt.parse_config(train_gpt.TrainConfig, ["--num-steps", "many"], train_gpt.PRESETS)


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
    return train_gpt.TrainConfig(**{**base, **over})


def train_log_losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f) if "loss" in row}


def test_random_windows_split_across_processes_exactly_and_resume(train_corpus, tmp_path):
    paths = train_gpt.prepare_data(train_run_cfg(train_corpus, tmp_path))
    one = train_gpt.RandomWindows(paths["train"], 6, 16, 0, 1, seed=3)
    ranks = [train_gpt.RandomWindows(paths["train"], 3, 16, r, 2, seed=3) for r in (0, 1)]
    for _ in range(3):
        x, y = one.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    later = train_gpt.RandomWindows(paths["train"], 6, 16, 0, 1, seed=3)
    later.load_state_dict(one.state_dict())
    assert torch.equal(later.next_batch()[0], one.next_batch()[0])
    starts = {tuple(one.next_batch()[0][:, 0].tolist()) for _ in range(3)}
    assert len(starts) == 3  # different windows every draw


def test_training_writes_checkpoint_metrics_log_and_curve(train_corpus, tmp_path, capsys):
    metrics = train_gpt.train(train_run_cfg(train_corpus, tmp_path))
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
    model, tok, meta = train_gpt.load_checkpoint(str(tmp_path))
    assert meta["step"] == 8 and meta["metrics"]["val_bpb"] == saved["val_bpb"]
    assert tok.hash() == Tokenizer.load(train_corpus["tokenizer"]).hash()
    assert len(list(model.generate([1], 5, seed=0))) == 5


def test_loss_goes_down(train_corpus, tmp_path):
    train_gpt.train(train_run_cfg(train_corpus, tmp_path, num_steps=30, eval_every=0, sample_every=0, warmdown_frac=0.2))
    losses = train_log_losses(tmp_path)
    assert sum(losses[k] for k in range(26, 31)) < sum(losses[k] for k in range(1, 6)) - 5 * 0.5


def test_same_seed_same_losses_and_resume_after_a_kill_is_bit_identical(train_corpus, tmp_path, monkeypatch):
    cfg = dict(num_steps=8, save_every=2, eval_every=0, sample_every=0)
    train_gpt.train(train_run_cfg(train_corpus, tmp_path / "straight", **cfg))
    train_gpt.train(train_run_cfg(train_corpus, tmp_path / "again", **cfg))
    straight = train_log_losses(tmp_path / "straight")
    assert train_log_losses(tmp_path / "again") == straight

    # "Kill" the run inside step 6 (2 micro-batches per step: the loader fails on its 11th batch); the last
    # checkpoint is from step 4
    calls, real_next = [0], train_gpt.RandomWindows.next_batch

    def dying_next(self):
        calls[0] += 1
        if calls[0] == 11:
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(train_gpt.RandomWindows, "next_batch", dying_next)
    with pytest.raises(KeyboardInterrupt):
        train_gpt.train(train_run_cfg(train_corpus, tmp_path / "killed", **cfg))
    monkeypatch.setattr(train_gpt.RandomWindows, "next_batch", real_next)
    assert train_gpt.load_checkpoint(str(tmp_path / "killed"))[2]["step"] == 4
    train_gpt.train(train_run_cfg(train_corpus, tmp_path / "killed", resume=True, **cfg))
    resumed = train_log_losses(tmp_path / "killed")
    assert [resumed[k] for k in range(5, 9)] == [straight[k] for k in range(5, 9)]  # exact equality


def test_diverging_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(train_corpus, tmp_path):
    train_gpt.train(train_run_cfg(train_corpus, tmp_path, num_steps=2, eval_every=0, sample_every=0))
    good = train_gpt.load_checkpoint(str(tmp_path))[2]
    with pytest.raises(train_gpt.UserError, match="diverged"):
        train_gpt.train(train_run_cfg(train_corpus, tmp_path, embed_lr=1e20, matrix_lr=1e20, head_lr=1e20, num_steps=20,
                         eval_every=0, sample_every=0, warmup_steps=0))
    assert train_gpt.load_checkpoint(str(tmp_path))[2]["step"] == good["step"] == 2


def run_train_main(argv, capsys):
    """Run the CLI in-process -> (exit code, stdout, stderr)."""
    try:
        train_gpt.run_cli(train_gpt.main, argv)
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
    train_gpt.train(train_run_cfg(train_corpus, tmp_path, num_steps=2, eval_every=0, sample_every=0))
    other = Tokenizer.train(train_corpus["text"], 280)
    with pytest.raises(train_gpt.UserError, match="trained with tokenizer .*vocab 280 vs model's 300"):
        train_gpt.load_checkpoint(str(tmp_path), tokenizer=other)
    with pytest.raises(train_gpt.UserError, match="cannot resume"):
        train_gpt.train(train_run_cfg(train_corpus, tmp_path, n_embd=64, resume=True))
    # a checkpoint whose stored tokenizer disagrees with its model's vocab
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    state["model_config"]["vocab_size"] = 299
    torch.save(state, tmp_path / "bad.pt")
    argv = ["eval", "--checkpoint", str(tmp_path / "bad.pt"), "--text", train_corpus["text"]]
    assert_train_error_line(run_train_main(argv, capsys), "tokenizer vocab 300 differs from the model's 299")


def test_eval_command_prints_bits_per_byte_of_a_text_file(train_corpus, tmp_path, capsys):
    train_gpt.train(train_run_cfg(train_corpus, tmp_path, num_steps=4, eval_every=0, sample_every=0))
    code, out, _ = run_train_main(["eval", "--checkpoint", str(tmp_path), "--text", train_corpus["text"]], capsys)
    assert code is None or code == 0
    bpb = float(out.split(" bits per byte")[0].split()[-1])
    assert 1 < bpb < 9


def test_text_bpb_counts_every_byte_once(train_corpus):
    tok = Tokenizer.load(train_corpus["tokenizer"])
    model = tiny_gpt(vocab_size=tok.vocab_size)
    text = open(train_corpus["text"], encoding="utf-8").read()[:1500]
    ids = tok.encode(text)
    rt = train_gpt.Runtime(torch.device("cpu"), None)
    res = train_gpt.text_bpb(model, tok, text, 3, rt)
    # the same figure computed directly, one window at a time: loss summed over predicted tokens / bytes
    nats = 0.0
    for s in range(0, len(ids) - 1, 32):
        w = torch.tensor([ids[s:s + 33]])
        logits = model(w[:, :-1])[0]
        nats += torch.nn.functional.cross_entropy(logits[0], w[0, 1:], reduction="sum").item()
    predicted_bytes = len(tok.decode_bytes(ids[1:]))
    assert res["bpb"] == pytest.approx(nats / predicted_bytes / 0.6931471805599453, rel=1e-5)


def test_demo_shows_the_true_token_gaining_probability(train_corpus, tmp_path, capsys):
    train_gpt.train(train_run_cfg(train_corpus, tmp_path, num_steps=4, eval_every=0, sample_every=0))
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
    train_gpt.train(one)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(HERE, "train_gpt.py"), *train_cli_flags(two)]
    # One launch in a full CI run (1 of ~15 seen) exited 1 with its output unseen; it passed 15 times in a
    # row alone. A second launch rides over a one-off start-up failure; two failures show the error.
    for _ in range(2):
        run = subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
        if run.returncode == 0:
            break
    assert run.returncode == 0, f"torchrun exited {run.returncode}:\n{run.stderr[-3000:]}"
    a, b = train_log_losses(tmp_path / "one"), train_log_losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    assert all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)
    assert a[5] < a[1] - 0.05  # and it is really training


@pytest.mark.slow
def test_torch_compile_on_cpu_gives_the_eager_losses(train_corpus, tmp_path):
    common = dict(num_steps=3, eval_every=0, sample_every=0)
    eager = train_gpt.train(train_run_cfg(train_corpus, tmp_path / "eager", compile="off", **common))
    compiled = train_gpt.train(train_run_cfg(train_corpus, tmp_path / "compiled", compile="on", **common))
    a, b = train_log_losses(tmp_path / "eager"), train_log_losses(tmp_path / "compiled")
    assert all(abs(a[k] - b[k]) < 1e-4 for k in a), (a, b)
    assert compiled["val_bpb"] == pytest.approx(eager["val_bpb"], abs=1e-3)


@pytest.mark.slow
def test_bench_train_reports_throughput_memory_and_time_to_target(train_corpus, tmp_path):
    import bench
    res = bench.measure_train("tiny", target_bpb=9.0, out_dir=str(tmp_path), **{
        k: v for k, v in vars(train_run_cfg(train_corpus, tmp_path, num_steps=4)).items()
        if k not in ("out_dir", "sample_every")})
    assert res["tokens_per_second"] > 0 and res["peak_memory_mb"] > 0 and res["mfu"] is None  # no MFU on CPU
    assert res["seconds_to_target"] is not None and 0 < res["seconds_to_target"] <= res["wall_seconds"]
    assert res["tokens"] == 4 * 256


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
    # --dump-dom can fire before the streamed reply is read to its end (the server has answered; seen once in
    # a full CI run): a second page load rides over that, and the assertions below judge the last one.
    for attempt in range(2):
        result = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                 f"--user-data-dir={tmp_path / str(attempt)}", "--virtual-time-budget=60000",
                                 "--dump-dom", api_server + "/?q=What%20is%202%2B2%3F"],
                                capture_output=True, text=True, timeout=120)
        if 'data-done="1"' in result.stdout:
            break
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


@given(st.integers(0, 2**31 - 1), st.integers(1, 40))
@settings(max_examples=25)
def test_any_sampled_reply_renders_back_into_the_history(seed, max_tokens):
    """Constrained decoding: whatever a (random) model samples, the stored reply is a well-formed
    assistant turn -- no stray tool outputs or ends, no unclosed calls."""
    tok = byte_tok()
    engine = Engine(tiny_model(tok.vocab_size, seq_len=128, seed=seed % 5), tok)
    prompt = render_for_completion(tok, [{"role": "user", "content": "hi"}])
    for completion in engine.generate(prompt, n=3, max_tokens=max_tokens, temperature=2.0, seed=seed):
        content = chat.assistant_content(tok, completion)
        render_conversation(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}])


# ====================================================================================================
# sft.py and the post-training datasets of data.py


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

TOOL_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2*3? Use code."},
             {"role": "assistant", "content": "Let me see. <|code_start|>2*3<|code_end|><|output_start|>6"
                                              "<|output_end|>\nThe answer is 6."}]


def test_targets_are_exactly_the_assistant_spans_with_tool_calls_never_tool_outputs():
    tok = byte_tok()
    ids, mask = render_conversation(tok, TOOL_CHAT)
    x, y = sft.collate([(ids, mask)], pad_id=0)
    assert x[0].tolist() == ids[:-1]
    trained = [t for t in y[0].tolist() if t >= 0]
    assert tok.decode(trained) == "Let me see. <|code_start|>2*3<|code_end|>\nThe answer is 6.<|im_end|>"
    out_start = tok.special_id("<|output_start|>")
    assert out_start not in trained and tok.special_id("<|output_end|>") not in trained


def small_model(tok, seed=0, seq_len=128):
    torch.manual_seed(seed)
    return train_gpt.GPT(train_gpt.GPTConfig(vocab_size=tok.vocab_size, seq_len=seq_len, n_layer=1, n_embd=32, n_head=2, n_kv_head=2))


def test_padding_is_ignored_and_a_fully_masked_batch_gives_a_finite_loss_and_no_update():
    tok, rt, cfg = byte_tok(), train_gpt.setup_runtime("cpu"), sft.SFTConfig()
    model = small_model(tok)
    optimizers = train_gpt.build_optimizers(model, cfg, "cpu")
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


def test_length_buckets_change_the_speed_not_the_step():
    """One step over buckets of 1 conversation equals one step over a single bucket of all of them: the
    gradients of the buckets add up to the gradient of the mean over every trained token."""
    tok, rt = byte_tok(), train_gpt.setup_runtime("cpu")
    rows = [render_conversation(tok, TOOL_CHAT), render_conversation(tok, TOOL_CHAT[1:]),
            render_conversation(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}])]
    buckets = sft.length_buckets(rows, 2)
    assert [len(b) for b in buckets] == [2, 1]
    assert [len(r[0]) for b in buckets for r in b] == sorted(len(r[0]) for r in rows)
    results = []
    for bucket_rows in (1, 32):
        cfg = sft.SFTConfig(bucket_rows=bucket_rows)
        model = small_model(tok)
        optimizers = train_gpt.build_optimizers(model, cfg, "cpu")
        loss, grad_norm, tokens = sft.train_step(model, optimizers, rows, 1.0, cfg, rt, pad_id=0)
        results.append((loss, grad_norm, tokens, [p.detach().clone() for p in model.parameters()]))
    (loss_a, norm_a, tokens_a, params_a), (loss_b, norm_b, tokens_b, params_b) = results
    assert tokens_a == tokens_b > 0 and loss_a == pytest.approx(loss_b, rel=1e-5)
    assert norm_a == pytest.approx(norm_b, rel=1e-4)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(params_a, params_b))


# -- the conversation generators --------------------------------------------------------------------

GENERATORS = [data.identity_conversation, data.word_problem_conversation, data.arithmetic_conversation,
              data.mental_arithmetic_conversation, data.counting_conversation, data.unknown_name_conversation, data.lecture_conversation]


@pytest.mark.parametrize("make", GENERATORS, ids=lambda f: f.__name__)
def test_generators_are_deterministic_and_render(make):
    first = [make(random.Random(5)) for _ in range(2)]
    rng_a, rng_b = random.Random(9), random.Random(9)
    assert first[0] == first[1] and [make(rng_a) for _ in range(30)] == [make(rng_b) for _ in range(30)]
    tok = byte_tok()
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


def test_mental_arithmetic_is_right_and_small_enough_to_need_no_tool():
    rng = random.Random(4)
    for difficulty in (1, 2):
        biggest = data.number_range(difficulty)[1]
        for _ in range(200):
            row = data.mental_arithmetic_conversation(rng, difficulty)
            expression, value = row["messages"][-1]["content"].split(" = ")
            assert eval(expression) == row["answer"] == int(value) >= 0  # right, whole, never negative
            assert all(int(n) <= 2 * biggest * biggest for n in expression.split()[::2])


def test_invented_names_appear_nowhere_in_the_corpus():
    corpus, rng = data.corpus_text_lower(), random.Random(0)
    for _ in range(50):
        assert all(part.lower() not in corpus for part in data.invented_name(rng, corpus).split())


@pytest.fixture
def mixture_without_models(tmp_path):
    """build_mixture with the model parts stubbed: no base model verdicts, a two-file search folder."""
    (tmp_path / "a.txt").write_text("First line of the first poem here\nSecond line of it follows now\n")
    (tmp_path / "b.txt").write_text("Another document with other words in it\nand a closing line for it\n")
    search, cfg = chat.Search(str(tmp_path)), sft.SFTConfig(conversations=400)
    known = {name: 1.0 for name, _, _ in data.play_characters()[::3]}
    return lambda **kw: sft.build_mixture(cfg, known, search, byte_tok(), **kw)


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
    r = subprocess.run([sys.executable, "sft.py", "--data", str(path), "--base", str(tmp_path / "none.pt")],
                       cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bad.jsonl:1" in r.stderr


def test_a_base_checkpoint_from_another_tokenizer_is_refused(tmp_path):
    tok, rt = byte_tok(), train_gpt.setup_runtime("cpu")
    path = str(tmp_path / "base.pt")
    train_gpt.save_checkpoint(path, small_model(tok), tok, 0, {})
    assert sft.load_model(path, rt, tok)[1].hash() == tok.hash()
    with pytest.raises(train_gpt.UserError, match="tokenizer"):
        sft.load_model(path, rt, Tokenizer([(97, 98)]))
    no_chat = Tokenizer([], special_tokens=("<|endoftext|>",))
    train_gpt.save_checkpoint(path, small_model(no_chat), no_chat, 0, {})
    with pytest.raises(train_gpt.UserError, match="chat tokens"):
        sft.load_model(path, rt)
    other = tmp_path / "other.json"
    Tokenizer([(97, 98)]).save(str(other))
    train_gpt.save_checkpoint(path, small_model(tok), tok, 0, {})
    r = subprocess.run([sys.executable, "sft.py", "--base", path, "--tokenizer", str(other)], cwd=HERE, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "tokenizer" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.slow
def test_end_to_end_tiny_run_writes_a_usable_checkpoint_and_metrics(tmp_path):
    tok = byte_tok()
    base = str(tmp_path / "base.pt")
    train_gpt.save_checkpoint(base, small_model(tok, seq_len=512), tok, 0, {})  # byte tokens: prompts need room
    out = tmp_path / "sft"
    r = subprocess.run([sys.executable, "sft.py", "--base", base, "--out-dir", str(out), "--num-steps", "2", "--conversations",
                        "60", "--eval-prompts", "2", "--eval-tokens", "8", "--interrogate-samples", "1"],
                       cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("format_rate", "identity_rate", "refusal_unknown_rate", "answer_known_rate", "tool_accuracy",
                "word_problem_accuracy", "train_seconds"):
        assert key in metrics
        assert key == "train_seconds" or 0 <= metrics[key] <= 1
    assert "step 2/2" in r.stdout and "base" in r.stdout and (out / "log.jsonl").exists()
    model, loaded_tok, meta = sft.load_model(str(out / "model.pt"), train_gpt.setup_runtime("cpu"), tok)
    assert meta["stage"] == "sft" and meta["metrics"]["format_rate"] == metrics["format_rate"]
    r = subprocess.run([sys.executable, "sft.py", "eval", "--checkpoint", str(out), "--base", base, "--eval-prompts", "2",
                        "--eval-tokens", "8"], cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["format_rate"] == metrics["format_rate"]


# ====================================================================================================
# rl.py


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
    right = chat.Completion(0, tok.encode("The answer is 5.<|im_end|>", allowed_special="all"), [], "stop")
    right.sampled = [1] * len(right.tokens)
    call = tok.encode("<|code_start|>2-3<|code_end|><|output_start|>-1<|output_end|>The answer is -1.<|im_end|>",
                      allowed_special="all")
    forced_from = call.index(tok.special_id("<|output_start|>"))
    forced_to = call.index(tok.special_id("<|output_end|>"))
    wrong = chat.Completion(0, call, [0 if forced_from <= i <= forced_to else 1 for i in range(len(call))], "stop")
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


@pytest.mark.parametrize("script, args, fragment", [
    ("rl.py", ["--algo", "ppo"], "--algo must be pg or best"),
    ("rl.py", ["--samples", "1"], "at least 2"),
    ("rl.py", ["--task", "mnist"], "--task must be"),
    ("rl.py", ["--checkpoint", "no/such/dir"], "no checkpoint at"),
    ("rl.py", ["--num-steps", "three"], "invalid int value"),
    ("rlhf.py", ["--rank-k", "1"], "at least 2"),
    ("rlhf.py", ["--temperature", "0"], "must be > 0"),
    ("rlhf.py", ["--checkpoint", "no/such/dir"], "no checkpoint at"),
    ("rlhf.py", ["--num-steps", "many"], "invalid int value"),
])
def test_rl_and_rlhf_user_mistakes_end_with_one_line_and_exit_code_2(script, args, fragment, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(HERE, script), "--out-dir", str(tmp_path), *args],
                            capture_output=True, text=True, cwd=str(tmp_path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0]


# ====================================================================================================
# rlhf.py
# ====================================================================================================


def test_human_score_likes_topic_real_words_verse_length_and_hates_repetition():
    good = "And love is strong as death, and cruel as the grave."
    assert rlhf.human_score(good, "love") > rlhf.human_score(good, "sea")  # on topic beats off topic
    assert rlhf.human_score(good, "love") > rlhf.human_score("Love zxqv blorp wug fnord snarf.", "love")
    assert rlhf.human_score(good, "love") > rlhf.human_score("Love.", "love")  # too short for a line
    assert rlhf.human_score("love love love love love love love", "love") < 0.2
    assert rlhf.human_score("But,,,,,,,, love!", "love") < 0.2 < rlhf.human_score("But, love!", "love")
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
    ("Shall I compare thee to a summer's day?", False), ("love love", False), ("But,,,,,,,!", True),
    ("O, love!", False),
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
    if importlib.util.find_spec("matplotlib") is None:  # optional: without it, the text curves only
        assert not (base / "loss_curve.png").exists()
    else:
        assert (base / "loss_curve.png").read_bytes()[:4] == b"\x89PNG" and "![base loss_curve](base/loss_curve.png)" in report


def test_system_message_is_spread_over_every_source_not_only_identity():
    """Half the rows of every source open with chat.py's system message, so a system message does not
    mean "say who you are"; a row that has one already keeps it, once."""
    rng = random.Random(0)
    rows = [sft.with_system_message(data.arithmetic_conversation(rng), rng) for _ in range(200)]
    with_system = [r for r in rows if r["messages"][0]["role"] == "system"]
    assert 60 < len(with_system) < 140 and all(r["messages"][0]["content"] == chat.SYSTEM_MESSAGE for r in with_system)
    assert all(sum(m["role"] == "system" for m in sft.with_system_message(r, rng)["messages"]) == 1 for r in with_system)


# ---- issue 16: Standard evaluations
import evals  # noqa: E402  (this section's module, imported where the section starts)


@pytest.fixture
def served_exams(server, tmp_path, monkeypatch):
    """evals.write_eval_fixtures in the folder the local server serves, HF_ENDPOINT pointed at it, and a
    fresh --data-dir: every task's file then downloads exactly as it would from the Hub."""
    base, root, log = server
    evals.write_eval_fixtures(str(root), n=40)
    monkeypatch.setenv("HF_ENDPOINT", f"{base}/ok")
    return str(tmp_path / "evaldata"), log


class OracleModel(torch.nn.Module):
    """A stand-in model that knows some token sequences by heart: after any prefix of one it gives the
    sequence's next token a big logit (probability ~1); everywhere else it gives all tokens equal logits."""

    def __init__(self, vocab_size, sequences, seq_len=512):
        super().__init__()
        self.config = train_gpt.GPTConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=1)
        self.vocab_size, self.next = vocab_size, {}
        for seq in sequences:
            for t in range(len(seq) - 1):
                self.next[tuple(seq[:t + 1])] = seq[t + 1]

    def forward(self, idx, targets=None, kv_cache=None):
        logits = torch.zeros(*idx.shape, self.vocab_size)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                if (token := self.next.get(tuple(row[:t + 1]))) is not None:
                    logits[b, t, token] = 30.0
        return logits, None


class RandomModel(torch.nn.Module):
    """Logits drawn at random (seeded): a guesser with no knowledge and no preference."""

    def __init__(self, vocab_size, seed=0, seq_len=512):
        super().__init__()
        self.config = train_gpt.GPTConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=1)
        self.vocab_size, self.generator = vocab_size, torch.Generator().manual_seed(seed)

    def forward(self, idx, targets=None, kv_cache=None):
        return torch.randn(*idx.shape, self.vocab_size, generator=self.generator), None


def exam_config(**over):
    return evals.EvalConfig(**{"batch_size": 16, "max_tokens": 16, **over})


def test_eval_fixtures_download_through_hf_endpoint_and_load_in_the_real_schemas(served_exams):
    data_dir, log = served_exams
    for name, task in evals.TASKS.items():
        items = evals.load_items(name, data_dir)
        assert len(items) == 40 and all(item["text"] for item in items)
        if name == "gsm8k":
            assert all(isinstance(item["answer"], int) for item in items)
        else:
            assert all(0 <= item["gold"] < len(item["choices"]) == 4 for item in items)
        assert f"/ok/datasets/{task.repo}/resolve/main/{task.path}" in [path for _, path, _ in log]
    requests_before = len(log)
    evals.load_items("mmlu", data_dir)  # cached: downloaded once
    assert len(log) == requests_before
    # ...under the server's name: a stand-in server's files are never later taken for the Hub's
    assert os.path.relpath(evals.data_file("mmlu", data_dir), data_dir).startswith("127.0.0.1_")


def test_eval_bad_or_truncated_file_is_one_clear_line(served_exams, tmp_path):
    data_dir, _ = served_exams
    path = evals.data_file("arc_easy", data_dir)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(data.DataError, match="not a readable parquet file.*delete it"):
        evals.load_items("arc_easy", data_dir)
    pq.write_table(pa.table({"text": ["not an exam"]}), path)
    with pytest.raises(data.DataError, match=r"lacks the columns \['id', 'question', 'choices', 'answerKey'\]"):
        evals.load_items("arc_easy", data_dir)


@pytest.mark.parametrize("name", ["hellaswag", "arc_easy", "arc_challenge", "mmlu"])
def test_loglik_scorer_oracle_scores_all_and_a_guesser_scores_chance(served_exams, name):
    """Base-model scoring: a model that gives the right continuation probability ~1 gets every item right
    (acc and acc_norm); a random guesser's score has the baseline inside its 95% interval."""
    data_dir, _ = served_exams
    tok, cfg = byte_tok(), exam_config()
    rt = train_gpt.setup_runtime("cpu")
    items = evals.load_items(name, data_dir)
    indices = list(range(len(items)))
    gold = [tok.encode(evals.loglik_context(name, it)) + tok.encode(" " + it["choices"][it["gold"]]) for it in items]
    oracle = evals.evaluate_task(OracleModel(tok.vocab_size, gold), tok, rt, name, items, indices, False, cfg)
    assert oracle[f"{name}_acc"] == 1.0 and oracle[f"{name}_acc_n"] == 40 and oracle[f"{name}_acc_baseline"] == 0.25
    if name == "hellaswag":
        assert oracle["hellaswag_acc_norm"] == 1.0
    guess = evals.evaluate_task(RandomModel(tok.vocab_size), tok, rt, name, items * 5, list(range(200)), False, cfg)
    assert guess[f"{name}_acc_lo"] <= 0.25 <= guess[f"{name}_acc_hi"] and guess[f"{name}_acc"] < 1.0


@pytest.mark.parametrize("name", ["arc_challenge", "mmlu"])
def test_letter_scorer_oracle_scores_all_and_a_guesser_scores_chance(served_exams, name):
    """Chat-model multiple choice: the letter with the highest logit as the reply's first token."""
    data_dir, _ = served_exams
    tok, cfg = byte_tok(), exam_config()
    rt = train_gpt.setup_runtime("cpu")
    items = evals.load_items(name, data_dir)
    gold = [evals.letter_prompt(tok, it) + tok.encode("ABCD"[it["gold"]]) for it in items]
    oracle = evals.evaluate_task(OracleModel(tok.vocab_size, gold), tok, rt, name, items, list(range(40)), True, cfg)
    assert oracle[f"{name}_acc"] == 1.0
    guess = evals.evaluate_task(RandomModel(tok.vocab_size), tok, rt, name, items * 5, list(range(200)), True, cfg)
    assert guess[f"{name}_acc_lo"] <= 0.25 <= guess[f"{name}_acc_hi"] and guess[f"{name}_acc"] < 1.0


class ScriptedEngine:
    """Stands in for chat.Engine: replies to each GSM8K prompt with a fixed function of its question."""
    reply = None  # question -> reply text; set per test

    def __init__(self, model, tok):
        self.tok = tok

    def generate(self, prompts, n=1, max_tokens=256, temperature=1.0, top_k=None, top_p=None, seed=None):
        end = self.tok.special_id("<|im_end|>")
        return [chat.Completion(i, self.tok.encode(self.reply(self.tok.decode(p))) + [end], finish="stop")
                for i, p in enumerate(prompts)]


def test_gsm8k_scorer_marks_the_answer_line_against_the_key(served_exams, monkeypatch):
    data_dir, _ = served_exams
    tok, cfg = byte_tok(), exam_config()
    rt = train_gpt.setup_runtime("cpu")
    items = evals.load_items("gsm8k", data_dir)
    answers = {it["question"]: it["answer"] for it in items}
    key_of = lambda prompt: next(a for q, a in answers.items() if q in prompt)  # noqa: E731
    monkeypatch.setattr(evals, "Engine", type("Right", (ScriptedEngine,), {
        "reply": staticmethod(lambda p: f"Let me add.\nThe answer is {key_of(p):,}.")}))
    model = RandomModel(tok.vocab_size)
    right = evals.evaluate_task(model, tok, rt, "gsm8k", items, list(range(40)), True, cfg)
    assert right["gsm8k_acc"] == 1.0 and right["gsm8k_acc_baseline"] == 0.0
    monkeypatch.setattr(evals, "Engine", type("Wrong", (ScriptedEngine,), {
        "reply": staticmethod(lambda p: f"The answer is {key_of(p) + 1}")}))
    assert evals.evaluate_task(model, tok, rt, "gsm8k", items, list(range(40)), True, cfg)["gsm8k_acc"] == 0.0


def test_wilson_interval_shrinks_with_n_and_covers_the_share():
    assert evals.wilson_interval(0, 10)[1] == pytest.approx(1.959964 ** 2 / (10 + 1.959964 ** 2))  # 0/n: z²/(n+z²)
    widths = []
    for n in (10, 100, 1000, 10000):
        lo, hi = evals.wilson_interval(n * 3 // 10, n)
        assert lo < 0.3 < hi
        widths.append(hi - lo)
    assert all(a > b for a, b in zip(widths, widths[1:]))
    assert widths[-1] == pytest.approx(2 * 1.96 * math.sqrt(0.3 * 0.7 / 10000), rel=0.01)  # large n: the normal one
    mean, lo, hi = evals.centred_mean([(0.25, 0.25, 100), (1.0, 0.25, 100)])
    assert mean == pytest.approx(0.5) and lo < 0.5 < hi


def contamination_setup(tmp_path, served_exams, train_text):
    """A pretraining shard holding `train_text` and the MMLU + GSM8K fixture items to check."""
    data_dir, _ = served_exams
    tok = byte_tok()
    data.write_shard(str(tmp_path / "pre_train_000000.bin"), tok.encode(train_text))
    exams = {name: (items, list(range(len(items)))) for name in ("mmlu", "gsm8k")
             for items in [evals.load_items(name, data_dir)]}
    cfg = exam_config(train_shards=(str(tmp_path / "pre_train_*.bin"),), generated=0)
    return tok, exams, cfg


def test_contamination_finds_a_planted_item_and_nothing_where_there_is_none(tmp_path, served_exams):
    """The fixture items are templated (they share their wording with each other, not with the prose), so
    the planted items get sentences of their own: exactly the planted one must be found."""
    prose = "Now is the winter of our discontent made glorious summer by this sun of York. " * 20
    planted = "A lighthouse keeper polishes 17 brass lamps every evening; how many in a fortnight?"
    quiet = lambda *a: None  # noqa: E731

    def setup(train_text):
        tok, exams, cfg = contamination_setup(tmp_path, served_exams, train_text)
        exams["gsm8k"][0][7]["text"] = planted
        exams["mmlu"][0][3]["text"] = "Which gas do green plants take in from the air to make sugar?"
        return tok, exams, cfg

    tok, exams, cfg = setup(prose)
    assert evals.contamination(tok, exams, cfg, log=quiet) == {"mmlu": 0, "gsm8k": 0}
    tok, exams, cfg = setup(prose + planted + prose)  # quoted whole inside a training document
    assert evals.contamination(tok, exams, cfg, log=quiet) == {"mmlu": 0, "gsm8k": 1}
    conversations = tmp_path / "sft.jsonl"  # ...or in a post-training conversation file
    data.write_jsonl(str(conversations), [{"messages": [
        {"role": "user", "content": "Which gas do green plants take in from the air to make sugar?"},
        {"role": "assistant", "content": "Carbon dioxide."}]}])
    tok, exams, cfg = setup(prose)
    cfg.train_texts = (str(conversations),)
    assert evals.contamination(tok, exams, cfg, log=quiet) == {"mmlu": 1, "gsm8k": 0}
    problems = tmp_path / "rl_train.jsonl"  # ...or among RL's practice problems ({"question", "answer"} rows)
    data.write_jsonl(str(problems), [{"question": planted, "answer": "17 * 2 * 7 = 238\n#### 238"}])
    cfg.train_texts = (str(problems),)
    assert evals.contamination(tok, exams, cfg, log=quiet) == {"mmlu": 0, "gsm8k": 1}
    (tmp_path / "bad.jsonl").write_text('{"title": "no text here"}\n')
    cfg.train_texts = (str(tmp_path / "bad.jsonl"),)
    with pytest.raises(data.DataError, match=r"bad.jsonl:1: not a training row"):
        evals.contamination(tok, exams, cfg, log=quiet)


def test_window_hashes_see_every_window_across_scan_chunks(monkeypatch):
    """The stream is hashed in chunks that overlap by n-1 tokens: a window straddling two chunks is found."""
    monkeypatch.setattr(evals, "SCAN_CHUNK", 10)
    item = list(range(500, 513))
    index = evals.OverlapIndex({"x": item}, 13)
    stream = np.array([1] * 5 + item + [2] * 30, dtype=np.uint16)  # the window spans tokens 5..17
    index.scan_stream(stream)
    assert index.seen == {"x"}


def test_evals_cli_partial_run_is_marked_deterministic_and_feeds_the_report_table(served_exams, tmp_path):
    """End to end: `python evals.py` on a saved tiny checkpoint, fixtures served through HF_ENDPOINT;
    --limit marks the run PARTIAL; the same seed gives the same scores; report_table shows stage x task."""
    data_dir, _ = served_exams
    tok = byte_tok()
    root = tmp_path / "out"
    for stage in ("base", "sft"):
        train_gpt.save_checkpoint(str(root / stage / "model.pt"), tiny_model(tok.vocab_size, seq_len=512), tok, 0, {},
                                  stage=stage)
    data.write_shard(str(tmp_path / "pre_train_000000.bin"), tok.encode("Some training text. " * 50))
    common = ["--data-dir", data_dir, "--limit", "12", "--train-shards", str(tmp_path / "pre_train_*.bin"),
              "--generated", "5", "--max-tokens", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.run([sys.executable, os.path.join(HERE, "evals.py"), "--checkpoint", str(root / stage), *common],
                           capture_output=True, text=True, timeout=300, env=env) for stage in ("base", "sft", "sft")]
    for r in runs:
        assert r.returncode == 0, r.stderr
        assert "PARTIAL: --limit 12" in r.stdout and "not on the benchmarks as published" in r.stdout
    base = json.loads((root / "evals" / "base" / "metrics.json").read_text())
    assert base["partial"] and base["hellaswag_acc_n"] == 12 and base["hellaswag_of"] == 40 and "core" in base
    assert {"hellaswag_overlap", "arc_easy_overlap", "arc_challenge_overlap"} <= set(base)
    sft_metrics = json.loads((root / "evals" / "sft" / "metrics.json").read_text())
    assert {"mmlu_acc", "arc_easy_acc", "gsm8k_acc", "chatcore"} <= set(sft_metrics) and "hellaswag_acc" not in sft_metrics
    assert runs[1].stdout.splitlines()[-8:-1] == runs[2].stdout.splitlines()[-8:-1]  # same seed, same table
    table = evals.report_table(str(root))
    assert (root / "evals" / "table.md").read_text() == "\n".join(table) + "\n"  # what the report card includes
    assert table[0].startswith("| stage | hellaswag_acc | hellaswag_acc_norm |") and "| base |" in table[2]
    assert table[3].startswith("| sft |") and table[3].endswith("| 12* |") and "not benchmark scores" in table[-1]


def test_evals_cli_user_mistakes_are_one_clear_line(tmp_path):
    for args, problem in ((["--tasks", "squad"], "--tasks: unknown squad"),
                          (["--checkpoint", str(tmp_path / "none")], "no checkpoint at"),
                          (["--train-shards", str(tmp_path / "nothing_*.bin")], "no token shards match")):
        result = run_cli("evals.py", *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and problem in lines[0], result.stderr


def test_published_references_are_printed_beside_a_peer_sized_model():
    metrics = {"stage": "base", "n_layer": 12, "partial": False, "hf_endpoint": data.DEFAULT_HF_ENDPOINT,
               **evals.figure("hellaswag_acc_norm", [True] * 30 + [False] * 70, 0.25), "hellaswag_overlap": 0.02}
    lines = evals.result_lines(metrics)
    row = next(line for line in lines if line.startswith("hellaswag_acc_norm"))
    assert "OpenAI GPT-2 124M 0.294 (llm.c discussion #481" in row and "FLAG >1%" in row and "0.300" in row
    assert not any("PARTIAL" in line or "HF_ENDPOINT" in line for line in lines)
    assert evals.references_for(4, "base") == {}  # the tiny model has no published peer


def test_few_shot_prefix_shows_other_solved_items_the_same_for_the_same_seed(served_exams):
    data_dir, _ = served_exams
    items = evals.load_items("arc_easy", data_dir)
    prefix = evals.few_shot_prefix("arc_easy", items, 5, 3, seed=1)
    assert prefix.count("Question: ") == 3 and prefix.endswith("\n\n") and items[5]["question"] not in prefix
    assert prefix == evals.few_shot_prefix("arc_easy", items, 5, 3, seed=1) != evals.few_shot_prefix("arc_easy", items, 5, 3, seed=2)
    assert evals.few_shot_prefix("arc_easy", items, 5, 0, seed=1) == ""
