"""Tests of data.py: downloads against a local HTTP server, every filter, the funnel, shards, the loader,
and the one-line errors. To be folded into test_all.py; everything below the imports is self-contained."""
import collections
import glob
import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings, strategies as st

import data
from tokenizer import Tokenizer

REPO = os.path.dirname(os.path.abspath(__file__))

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
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
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
    blocklist = data.load_list([os.path.join(REPO, "data", "url_blocklist.txt")], "--blocklist")
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
    stats = data.process([data.WEB_SAMPLE_GLOB], str(tmp_path), [os.path.join(REPO, "data", "url_blocklist.txt")],
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


def run_cli(*args):
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
    code = run_cli("process", "--input", path, "--out", str(out), "--tokenizer", tiny_tokenizer)
    err = capsys.readouterr().err
    assert code == 2 and re.search(expected, err) and err.count("\n") == 1
    assert not out.exists() or os.listdir(out) == []
    code = run_cli("tokenize", "--input", path, "--name", "x", "--out", str(out), "--tokenizer", tiny_tokenizer)
    assert code == 2 and re.search(expected, capsys.readouterr().err)
    assert not os.path.exists(out / "x" / "meta.json")
    assert not any(".tmp-" in f for _, _, files in os.walk(out) for f in files)


def test_cli_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "data.py", "process", "--input", str(tmp_path / "nope.txt"),
                           "--out", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=60)
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
