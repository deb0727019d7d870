"""
bench.py -- measured speed and quality, side by side with the peers, in one run on one machine.

    python bench.py tokenizer   # train time, encode MB/s, bytes/token vs rustbpe, HF tokenizers, tiktoken
    python bench.py digits      # how the digit grouping of the split regex was chosen
    python bench.py data        # tokenizing the embedded corpus into shards, and the filter funnel's
                                # pages/s on the web sample, on 1 and 2 processes
    python bench.py train       # a full tiny pretraining run: tokens/s, memory, time to 2.2 bits per byte
    python bench.py infer       # KV-cache decoding vs recomputing the whole sequence, prefill speed
    python bench.py gpu         # a GPU preset's training step (d12): tokens/s, MFU, memory, beside the dry-run
    python bench.py rl          # an RL step: rollout tokens/s, sampling vs learning time
    python bench.py codetool    # the code tool's worker process: per-call cost against in-process
    python bench.py longword    # encoding one long word: heap BPE against the quadratic scan
    python bench.py serve       # 16 concurrent streaming clients × 10 requests against chat.py --web
    python bench.py yardstick   # a fixed small torch workload: how fast this machine is today
    python bench.py threads     # short runs of pretraining, SFT and RL at 1 and 2 threads, quiet and beside
                                # a busy process
    python bench.py kernel      # user/sys time and page faults of those runs, with and without the allocator
                                # policy (train_gpt.keep_freed_memory)
    python bench.py compile     # torch.compile on the CPU at the tiny preset: compile time vs per-step saving
    python bench.py pipeline    # `bash run.sh --fresh` in a clean copy, quiet and beside a busy process

Each benchmark prints a table and one JSON line, and rewrites its own section of BENCHMARKS.md (with the
command, the machine and the machine's yardstick), leaving the other sections alone. Peers are benchmark-only
dependencies: the
bench installs them (pinned) when they are missing; users never need them.
"""
import argparse
import contextlib
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import regex
import torch

import chat
import data
import rl
import train_gpt
from tokenizer import SPECIAL_TOKENS, Tokenizer, available_cpus, gpt4_encoding, split_pattern

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_CORPUS = os.path.join(HERE, "..", "shared", "corpus")
BENCHMARKS_MD = os.path.join(HERE, "BENCHMARKS.md")
PEERS = {"tokenizers": "tokenizers==0.23.3", "rustbpe": "rustbpe==0.1.0", "tiktoken": "tiktoken==0.14.0"}


# ----------------------------------------------------------------------------------------------------
# Shared helpers

def machine():
    """One line naming the machine, for every recorded figure."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {available_cpus()} cores, Python {platform.python_version()}, {platform.system()}"


def ensure_peers(*names):
    """Import the peer libraries, installing the pinned versions first if they are missing."""
    missing = []
    for name in names:
        try:
            __import__(name)
        except ImportError:
            missing.append(PEERS[name])
    if missing:
        print(f"installing benchmark peers: {' '.join(missing)}")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)
    return [__import__(name) for name in names]


def best_time(fn, repeats):
    """The fastest of `repeats` runs of fn(): the least disturbed by the rest of the machine."""
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def print_table(header, rows):
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name, body):
    """Replace the section between `<!-- bench:name -->` markers in BENCHMARKS.md (append if new)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = open(BENCHMARKS_MD).read() if os.path.exists(BENCHMARKS_MD) else "# Benchmarks\n"
    block = f"{start}\n{body.strip()}\n\n{yardstick_line()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = BENCHMARKS_MD + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, BENCHMARKS_MD)
    print(f"wrote the '{name}' section of {BENCHMARKS_MD}")


def read_documents(path):
    """A corpus file as documents: split at a blank line followed by text (see ../shared/corpus/README.md);
    with the GPT-4-style split no chunk crosses such a boundary, so every trainer sees the same chunks."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return text, regex.split(r"(?<=\n\n)(?=\S)", text)


# ----------------------------------------------------------------------------------------------------
# The machine yardstick: a fixed torch workload whose time says how fast this machine is today. Timings from
# different days or machines compare as ratios to it (a run 1.3x slower on a machine whose yardstick is 1.3x
# slower is no slower at all). It uses plain torch operations of fixed shapes, not the project's model, so
# that changing the model never changes the yardstick.

YARDSTICK_ROUNDS = 5
_yardstick = None  # (median seconds, spread, load average), measured once per bench.py process


def yardstick_round():
    """One round: forward and backward of a two-layer ReLU² MLP with a softmax cross-entropy head, on one
    thread, in float32: matrix multiplies, elementwise work and a reduction, like a training step."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 256, generator=generator)
    w1 = torch.randn(256, 1024, generator=generator).div_(16).requires_grad_()
    w2 = torch.randn(1024, 2048, generator=generator).div_(32).requires_grad_()
    targets = torch.randint(0, 2048, (2048,), generator=generator)
    started = time.perf_counter()
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(torch.relu(x @ w1).square() @ w2, targets)
        loss.backward()
    return time.perf_counter() - started


def yardstick():
    """-> (median seconds of YARDSTICK_ROUNDS rounds, (fastest, slowest), 1-minute load average). The median, not
    the best: the point is how fast the machine is now, load included; the spread and the load say how steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yardstick_round()  # warm-up: the first round pays for allocation and library start-up
        times = [yardstick_round() for _ in range(YARDSTICK_ROUNDS)]
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times), (min(times), max(times)), os.getloadavg()[0]


def measured_yardstick():
    global _yardstick
    if _yardstick is None:
        _yardstick = yardstick()
    return _yardstick


def yardstick_line():
    seconds, (low, high), load = measured_yardstick()
    return (f"Machine yardstick (`python bench.py yardstick`): {seconds:.3f} s (rounds {low:.3f}–{high:.3f} s, "
            f"load average {load:.1f}) on {machine()}; lower is faster.")


def bench_yardstick(args):
    seconds, (low, high), load = measured_yardstick()
    print(yardstick_line())
    print(json.dumps({"bench": "yardstick", "seconds": round(seconds, 4), "fastest": round(low, 4),
                      "slowest": round(high, 4), "load_1min": load, "machine": machine()}))


# A learner's laptop is never idle: a browser or an editor takes a core now and then. The busy process is
# that, reproducibly: one Python loop burning a whole core. It stops by itself after max_seconds, or when
# its parent has gone (so a bench killed hard leaves nothing behind), and busy_process() kills it when the
# block ends, exceptions included.
BUSY_LOOP = """
import os, sys, time
parent, end = int(sys.argv[2]), time.monotonic() + float(sys.argv[1])  # the bench's pid, given: were the
# bench killed before this line ran, os.getppid() would already name the process that adopted us
while time.monotonic() < end and os.getppid() == parent:
    for _ in range(100_000):
        pass
"""


@contextlib.contextmanager
def busy_process(max_seconds=3600):
    """`with busy_process():` runs the block beside one CPU-burning process; yields its Popen."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(max_seconds), str(os.getpid())])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def beside(load):
    """The context a run is measured in: "quiet" (nothing started by the bench) or "busy" (busy_process)."""
    return busy_process() if load == "busy" else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------
# bench.py tokenizer

def train_hf(documents, n_regular, pattern):
    """Hugging Face `tokenizers` BPE with the same split regex, then byte-level mapping, no specials."""
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=n_regular, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(documents, trainer)
    return hf


def train_rustbpe(documents, n_regular, pattern):
    import rustbpe
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(documents), n_regular, pattern=pattern)
    return tok


def bench_tokenizer(args):
    tokenizers_lib, rustbpe, tiktoken = ensure_peers("tokenizers", "rustbpe", "tiktoken")
    corpus_path = os.path.abspath(args.corpus)
    corpus, documents = read_documents(corpus_path)
    heldout, _ = read_documents(args.heldout)
    corpus_mb, heldout_mb = len(corpus.encode()) / 1e6, len(heldout.encode()) / 1e6
    pattern = split_pattern()
    print(f"corpus {corpus_path}: {corpus_mb:.1f} MB, {len(documents):,} documents; held-out {heldout_mb:.1f} MB")
    print(f"machine: {machine()}\n")

    rows, figures = [], {"corpus_mb": round(corpus_mb, 2), "machine": machine()}
    load_before = os.getloadavg()[0]
    for vocab in (4096, 8192):
        n_regular = vocab - len(SPECIAL_TOKENS)  # peers get the same number of merges, no specials
        ours_s, ours = best_time(lambda: Tokenizer.train(iter(documents), vocab), args.repeats)
        hf_s, hf = best_time(lambda: train_hf(documents, n_regular, pattern), args.repeats)
        rust_s, _ = best_time(lambda: train_rustbpe(documents, n_regular, pattern), args.repeats)
        ours_bpt = len(heldout.encode()) / len(ours.encode_ordinary(heldout))
        hf_bpt = len(heldout.encode()) / len(hf.encode(heldout).ids)
        rows.append([vocab, f"{ours_s:.2f}", f"{hf_s:.2f}", f"{rust_s:.2f}", f"{ours_s / hf_s:.2f}",
                     f"{ours_bpt:.3f}", f"{hf_bpt:.3f}"])
        figures[f"train_s_{vocab}"] = {"ours": round(ours_s, 3), "hf": round(hf_s, 3), "rustbpe": round(rust_s, 3)}
        figures[f"bytes_per_token_{vocab}"] = {"ours": round(ours_bpt, 4), "hf": round(hf_bpt, 4)}
    train_header = ["vocab", "ours s", "HF tokenizers s", "rustbpe s", "ours / HF", "ours bytes/token",
                    "HF bytes/token"]
    print_table(train_header, rows)

    # Encoding, one process each. Ours starts with an empty chunk cache every time (a fresh tokenizer
    # from the same merges), so the cold-cache cost is in the figure.
    merges = ours.merges
    enc = ours.to_tiktoken()
    gpt4 = gpt4_encoding()
    encode_rows = []
    for label, text, mb in (("held-out text", heldout, heldout_mb), ("20 MB corpus", corpus, corpus_mb)):
        ours_s, ours_ids = best_time(lambda: Tokenizer(merges).encode_ordinary(text), args.repeats)
        tik_s, tik_ids = best_time(lambda: enc.encode_ordinary(text), args.repeats)
        assert ours_ids == tik_ids, "our encoding differs from tiktoken's on the same merges"
        encode_rows.append([label, f"{mb / ours_s:.2f}", f"{mb / tik_s:.2f}", f"{tik_s / ours_s:.2f}"])
        figures[f"encode_mb_s_{label.split()[0]}"] = {"ours": round(mb / ours_s, 3), "tiktoken": round(mb / tik_s, 3)}
    print()
    encode_header = ["encode (1 process, vocab 8192)", "ours MB/s", "tiktoken MB/s", "ours / tiktoken"]
    print_table(encode_header, encode_rows)
    batch_s, _ = best_time(lambda: Tokenizer(merges).encode_batch(documents), 1)
    figures["encode_batch_mb_s"] = round(corpus_mb / batch_s, 3)
    print(f"\nencode_batch on the corpus, {available_cpus()} processes: {corpus_mb / batch_s:.2f} MB/s")
    if gpt4 is not None:
        figures["gpt4_bytes_per_token"] = round(len(heldout.encode()) / len(gpt4.encode_ordinary(heldout)), 4)
        print(f"GPT-4 (cl100k_base, vocab 100,277) on the held-out text: {figures['gpt4_bytes_per_token']:.3f} bytes/token")
    figures["load_1min"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    print(json.dumps({"bench": "tokenizer", **figures}))

    command = f"python bench.py tokenizer --corpus {os.path.relpath(corpus_path, HERE)} --repeats {args.repeats}"
    write_section("tokenizer", f"""
## Tokenizer

`{command}` — {machine()}. Corpus: {corpus_mb:.1f} MB of `{os.path.basename(corpus_path)}` in
{len(documents):,} documents; held-out: `{os.path.basename(args.heldout)}` ({heldout_mb:.1f} MB). Best of
{args.repeats} runs each. Every trainer gets the same documents, the same split regex and the same number of
merges; ours splits the chunk counting over {available_cpus()} processes, rustbpe and HF use all cores.
Load average {figures['load_1min'][0]} at the start, {figures['load_1min'][1]} at the end (other work on the
machine slows every column; the ratio of columns measured in the same run is the figure to compare).

{markdown_table(train_header, rows)}

{markdown_table(encode_header, encode_rows)}

`encode_batch` ({available_cpus()} processes) on the corpus: {corpus_mb / batch_s:.2f} MB/s.
GPT-4's cl100k_base on the held-out text: {figures.get('gpt4_bytes_per_token', 'n/a')} bytes/token (vocab 100,277).
Our ids equal tiktoken's on both texts (checked by the bench).
""")


# ----------------------------------------------------------------------------------------------------
# bench.py tokenizer-scale: is our trainer fast enough for the GPU presets' tokenizer?

GPU_TOKENIZER_SLICE_MB = 2000  # run.sh trains the GPU presets' BPE on ~2B characters of FineWeb-Edu


def bench_tokenizer_scale(args):
    """Train at the GPU presets' vocabulary on two sizes of the shared corpus (its first quarter and all of
    it), ours beside rustbpe and HF tokenizers, then extrapolate each to the ~2 GB slice run.sh trains on
    with a straight line through the two sizes (counting chunks grows with the text; the merges grow with
    the number of distinct chunks, which grows more slowly: a straight line overestimates, if anything)."""
    ensure_peers("tokenizers", "rustbpe")
    corpus, documents = read_documents(os.path.abspath(args.corpus))
    quarter = documents[:len(documents) // 4]
    sizes = [len("".join(d).encode()) / 1e6 for d in (quarter, documents)]
    pattern, n_regular = split_pattern(), args.vocab_size - len(SPECIAL_TOKENS)
    trainers = {"ours": lambda docs: Tokenizer.train(iter(docs), args.vocab_size),
                "rustbpe": lambda docs: train_rustbpe(docs, n_regular, pattern),
                "HF tokenizers": lambda docs: train_hf(docs, n_regular, pattern)}
    seconds = {name: [best_time(lambda: fn(docs), 1)[0] for docs in (quarter, documents)]
               for name, fn in trainers.items()}
    rows, figures = [], {"vocab": args.vocab_size, "mb": [round(m, 2) for m in sizes], "machine": machine()}
    for name, (small, big) in seconds.items():
        slope = (big - small) / (sizes[1] - sizes[0])
        slice_s = big + slope * (GPU_TOKENIZER_SLICE_MB - sizes[1])
        rows.append([name, f"{small:.1f}", f"{big:.1f}", f"{big / seconds['rustbpe'][1]:.2f}", fmt_minutes(slice_s)])
        figures[name] = {"s": [round(small, 2), round(big, 2)], "slice_s_estimate": round(slice_s)}
    header = ["trainer", f"{sizes[0]:.1f} MB s", f"{sizes[1]:.1f} MB s", "/ rustbpe (full)",
              f"{GPU_TOKENIZER_SLICE_MB} MB slice (extrapolated)"]
    print_table(header, rows)
    print(json.dumps({"bench": "tokenizer-scale", **figures}))
    command = f"python bench.py tokenizer-scale --vocab-size {args.vocab_size}"
    write_section("tokenizer-scale", f"""
## Tokenizer training at the GPU presets' vocabulary

`{command}` — {machine()}. Vocabulary {args.vocab_size:,}; the first quarter and the whole of
`{os.path.basename(args.corpus)}`; one run each (the machine's load is in BENCHMARKS.md's text). The last column
is a straight-line extrapolation to the ~{GPU_TOKENIZER_SLICE_MB} MB FineWeb-Edu slice run.sh trains the GPU
presets' tokenizer on: an estimate, not a measurement.

{markdown_table(header, rows)}
""")


def fmt_minutes(seconds):
    return f"~{seconds / 60:.0f} min" if seconds >= 60 else f"~{seconds:.0f} s"


# ----------------------------------------------------------------------------------------------------
# bench.py digits

def arithmetic_text(n_lines=500, seed=0):
    """Text shaped like the later stages' word problems: prices, counts and sums."""
    rng = random.Random(seed)
    return "\n".join(f"Emily buys {rng.randint(2, 99)} apples at ${rng.randint(1, 999)} each; "
                     f"{rng.randint(10, 9999)} + {rng.randint(10, 9999)} = ?" for _ in range(n_lines))


def bench_digits(args):
    val = "".join(data.embedded_documents("val"))
    arithmetic = arithmetic_text()
    header = ["digits per chunk", "held-out bytes/token", "arithmetic bytes/token", "multi-digit tokens",
              "0..999 split along the groups"]
    rows, figures = [], {}
    for group in (1, 2, 3):
        tok = Tokenizer.train(data.embedded_documents("train"), args.vocab_size, pattern=split_pattern(group))
        multi_digit = sum(1 for t in tok.vocab[256:] if t.isdigit())
        # a number "follows its groups" when it becomes exactly one token per group of digits
        regular = sum(len(tok.encode(str(n))) == -(-len(str(n)) // group) for n in range(1000))
        val_bpt = len(val.encode()) / len(tok.encode(val))
        arith_bpt = len(arithmetic.encode()) / len(tok.encode(arithmetic))
        rows.append([group, f"{val_bpt:.3f}", f"{arith_bpt:.3f}", multi_digit, f"{regular}/1000"])
        figures[group] = {"val_bytes_per_token": round(val_bpt, 4), "arith_bytes_per_token": round(arith_bpt, 4),
                          "multi_digit_tokens": multi_digit, "regular_0_999": regular}
    print_table(header, rows)
    print(json.dumps({"bench": "digits", **{str(k): v for k, v in figures.items()}}))
    write_section("digits", f"""
## Digit grouping of the split regex

`python bench.py digits --vocab-size {args.vocab_size}` — trained on the embedded corpus (train split),
measured on its held-out split and on synthetic word-problem text; {machine()}.

{markdown_table(header, rows)}

Chosen: single digits (see the docstring of tokenizer.py).
""")


# ----------------------------------------------------------------------------------------------------
# bench.py data

def cpu_seconds():
    """CPU time used so far by this process and its finished children (the tokenizer's worker pools)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure_data(repeats=3):
    """Tokenize the embedded training split into .bin shards with 1 and with 2 worker processes (the
    fastest of `repeats` runs each, the text already in memory) and check both give the same bytes.
    Returns the figures as a flat dict."""
    tokenizer_path = data.prepare_tokenizer()
    texts = list(data.embedded_documents("train"))
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    figures, shard_bytes = {"data_text_mb": round(mb, 3)}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for processes in (1, 2):
            name = f"bench{processes}"
            cpu_before = cpu_seconds()
            seconds, meta = best_time(lambda: data.tokenize_to_shards({"train": texts}, name, tokenizer_path, tmp,
                                                                      processes), repeats)
            figures[f"data_tokenize_mb_s_{processes}proc"] = round(mb / seconds, 2)
            # CPU time over the best wall time: how many cores were actually busy (the machine may be shared)
            figures[f"data_tokenize_cores_busy_{processes}proc"] = round((cpu_seconds() - cpu_before) / repeats
                                                                         / seconds, 2)
            figures["data_tokens"] = meta["splits"]["train"]["tokens"]
            with open(os.path.join(tmp, name, f"{name}_train_000000.bin"), "rb") as f:
                shard_bytes[processes] = f.read()
    if shard_bytes[1] != shard_bytes[2]:
        raise AssertionError("1 and 2 processes wrote different shards")
    figures["data_tokenize_speedup_2proc"] = round(figures["data_tokenize_mb_s_2proc"]
                                                   / figures["data_tokenize_mb_s_1proc"], 2)
    print_table(["processes", "MB of text", "tokens", "MB/s", "cores busy"],
                [[p, f"{mb:.2f}", f"{figures['data_tokens']:,}", figures[f"data_tokenize_mb_s_{p}proc"],
                  figures[f"data_tokenize_cores_busy_{p}proc"]] for p in (1, 2)])
    return figures


def measure_funnel(repeats=3, copies=20):
    """Pages/s through the whole filter funnel (trafilatura, fastText, Gopher, MinHash, C4, PII, token
    counts) on 1 and 2 processes: the web sample's pages, each `copies` times, already in memory. Every
    copy after the first is dropped as a duplicate at MinHash, after the per-page work before it
    (extraction, language, Gopher, the signature) -- the bulk of the cost. Checks that both process counts
    keep the same rows."""
    pages = list(data.read_documents(data.expand_inputs([data.WEB_SAMPLE_GLOB])))
    docs = [{**page, "file_path": f"{page['file_path']}#{i}"} for i in range(copies) for page in pages]
    tok = data.load_tokenizer(data.prepare_tokenizer())
    blocklist = data.load_list([os.path.join(data.EMBEDDED_DIR, "url_blocklist.txt")], "--blocklist")
    data.language_identifier()  # load fastText before timing, as `process` does
    figures = {"funnel_pages": len(docs), "funnel_copies": copies, "funnel_load_average": round(os.getloadavg()[0], 2)}
    kept = {}

    def run_funnel(processes):
        filters = data.make_filters(blocklist)
        count = lambda text: len(tok.encode(text))
        return list(data.run_funnel(docs, filters, count, data.new_stats(filters), processes))

    for processes in (1, 2):
        cpu_before = cpu_seconds()
        seconds, kept[processes] = best_time(lambda: run_funnel(processes), repeats)
        figures[f"funnel_pages_s_{processes}proc"] = round(len(docs) / seconds, 1)
        figures[f"funnel_cores_busy_{processes}proc"] = round((cpu_seconds() - cpu_before) / repeats / seconds, 2)
    if kept[1] != kept[2]:
        raise AssertionError("1 and 2 processes kept different rows")
    figures["funnel_kept"] = len(kept[1])
    figures["funnel_speedup_2proc"] = round(figures["funnel_pages_s_2proc"] / figures["funnel_pages_s_1proc"], 2)
    print_table(["processes", "pages", "pages/s", "cores busy"],
                [[p, len(docs), figures[f"funnel_pages_s_{p}proc"], figures[f"funnel_cores_busy_{p}proc"]]
                 for p in (1, 2)])
    return figures


def bench_data(args):
    if args.part in ("all", "tokenize"):
        bench_tokenize_shards(args)
    if args.part in ("all", "funnel"):
        bench_funnel(args)


def bench_tokenize_shards(args):
    figures = measure_data(args.repeats)
    print(json.dumps({"bench": "data", **figures}))
    rows = [[p, f"{figures['data_tokenize_mb_s_' + str(p) + 'proc']}", figures[f"data_tokenize_cores_busy_{p}proc"]]
            for p in (1, 2)]
    write_section("data", f"""
## Data: tokenizing the embedded corpus into shards

`python bench.py data --repeats {args.repeats}` — {machine()}. {figures['data_text_mb']} MB of text,
{figures['data_tokens']:,} tokens, written as `.bin` shards by `data.tokenize_to_shards` (both process counts
write identical bytes, checked). "Cores busy" is CPU time over wall time: below 2 with 2 processes means the
machine was shared or the work did not split evenly.

{markdown_table(["processes", "MB/s", "cores busy"], rows)}

Speed-up with 2 processes: {figures['data_tokenize_speedup_2proc']}x.
""")


def bench_funnel(args):
    figures = measure_funnel(args.repeats)
    print(json.dumps({"bench": "data-funnel", **figures}))
    rows = [[p, figures[f"funnel_pages_s_{p}proc"], figures[f"funnel_cores_busy_{p}proc"]] for p in (1, 2)]
    write_section("data-funnel", f"""
## Data: the filter funnel on web pages

`python bench.py data --part funnel --repeats {args.repeats}` — {machine()}; load average
{figures['funnel_load_average']} when it started (the machine's 1-minute average of busy processes: above the
core count means other work shared the cores). {figures['funnel_pages']} pages: the
{figures['funnel_pages'] // figures['funnel_copies']} pages of `data/web_sample/`, {figures['funnel_copies']} times each, through every filter of
`data.run_funnel` (trafilatura, fastText lid.176, Gopher, MinHash, C4, PII, token counts); copies after the
first are dropped at MinHash, after the per-page work before it. Both process counts keep the same
{figures['funnel_kept']} rows (checked). The fastest of {args.repeats} runs, pool start-up included.

{markdown_table(["processes", "pages/s", "cores busy"], rows)}

Speed-up with 2 processes: {figures['funnel_speedup_2proc']}x.
""")


# ----------------------------------------------------------------------------------------------------
# bench.py train

def peak_memory_mb(device_type):
    """Peak memory of this process: GPU memory allocated by torch on CUDA, resident set size on CPU."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def seconds_to_reach(log_path, target_bpb):
    """Wall time (since launch) of the first validation at or below target_bpb in a run's log; None if never."""
    with open(log_path) as f:
        for row in map(json.loads, f):
            if row.get("val_bpb", float("inf")) <= target_bpb:
                return row["elapsed"]
    return None


def measure_train(preset="tiny", target_bpb=2.2, out_dir=os.path.join("out", "bench", "train"), **overrides):
    """Train `preset` (with any TrainConfig field overridden) and return the benchmark's figures as a dict.
    Validation runs every eval_every steps (default: every tenth of the run) so the time to target is seen."""
    fields = {**train_gpt.PRESETS[preset], "out_dir": out_dir, "sample_every": 0, **overrides}
    cfg = train_gpt.TrainConfig(**fields)
    if "eval_every" not in overrides:
        cfg.eval_every = max(1, cfg.num_steps // 10)
    started = time.time()
    metrics = train_gpt.train(cfg)
    device = train_gpt.setup_runtime(cfg.device, cfg.dtype).device
    return dict(
        preset=preset, device=str(device), params=metrics["params"], tokens=metrics["tokens"],
        tokens_per_second=metrics["tokens_per_second"], mfu=metrics["mfu"],
        peak_memory_mb=peak_memory_mb(device.type), val_bpb=metrics["val_bpb"], target_bpb=target_bpb,
        seconds_to_target=seconds_to_reach(os.path.join(out_dir, "log.jsonl"), target_bpb),
        wall_seconds=time.time() - started,
    )


def bench_train(args):
    figures = measure_train(args.preset, target_bpb=args.target_bpb)
    print(json.dumps({"bench": "train", **figures}))
    header = ["preset", "device", "params", "tokens", "tokens/s", "MFU", "peak memory MB", "val bpb",
              f"s to bpb {args.target_bpb}", "wall s"]
    row = [figures["preset"], figures["device"], f"{figures['params']:,}", f"{figures['tokens']:,}",
           f"{figures['tokens_per_second']:,.0f}", "n/a" if figures["mfu"] is None else f"{figures['mfu']:.1%}",
           f"{figures['peak_memory_mb']:,.0f}", f"{figures['val_bpb']:.4f}",
           "not reached" if figures["seconds_to_target"] is None else f"{figures['seconds_to_target']:.0f}",
           f"{figures['wall_seconds']:.0f}"]
    print_table(header, [row])
    write_section(f"train-{args.preset}", f"""
## Pretraining: the `{args.preset}` preset

`python bench.py train --preset {args.preset} --target-bpb {args.target_bpb}` — {machine()}. The full run of
`python train_gpt.py --preset {args.preset}` (validation every tenth of the run, no samples), on the embedded
corpus; val bpb on the whole held-out split.

{markdown_table(header, [row])}
""")


# ----------------------------------------------------------------------------------------------------
# bench.py gpu: the pretraining step at a GPU preset, measured beside the dry-run's estimates

class RandomTokens:
    """Batches of uniformly random token ids: the speed of a training step does not depend on what the
    tokens say, and this needs no downloaded data and no trained tokenizer."""

    def __init__(self, batch_size, seq_len, vocab_size, seed=0):
        self.shape, self.vocab_size = (batch_size, seq_len + 1), vocab_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self):
        rows = torch.randint(0, self.vocab_size, self.shape, generator=self.generator)
        return rows[:, :-1], rows[:, 1:]


def measure_gpu(preset="d12", steps=300, device="auto", vocab_size=train_gpt.GPU_VOCAB_SIZE):
    """`steps` optimizer steps of train_gpt's own train_step at `preset` (compiled, bf16 autocast on CUDA)
    on one device -> figures: tokens/s and MFU of the steady steps, the first step's extra time (mostly
    compilation), peak memory, and the dry-run's estimates for the same run."""
    cfg = train_gpt.TrainConfig(**train_gpt.PRESETS[preset], device=device)
    rt = train_gpt.setup_runtime(cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    model = train_gpt.build_model(cfg, vocab_size).to(rt.device)
    optimizers = train_gpt.build_optimizers(model, cfg, rt.device.type)
    train_model, _ = train_gpt.wrap_for_training(model, cfg, rt)
    accum = cfg.total_batch_tokens // (cfg.batch_size * cfg.seq_len)
    loader = RandomTokens(cfg.batch_size, cfg.seq_len, vocab_size)
    times = []
    for step in range(steps):
        t0 = time.time()
        train_gpt.train_step(model, train_model, None, optimizers, loader, accum, 1.0, cfg, rt)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t0)
    steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]  # the median step
    peak = train_gpt.peak_flops(rt.device)
    config = model.config
    estimate = sum(train_gpt.memory_plan(cfg, config, 1).values()) + train_gpt.GPU_OVERHEAD_GIB * train_gpt.GIB
    flops_per_step = model.flops_per_token() * cfg.total_batch_tokens
    return dict(preset=preset, device=str(rt.device), device_name=torch.cuda.get_device_name(rt.device)
                if rt.device.type == "cuda" else platform.processor() or "cpu", steps=steps,
                params=model.num_params(), tokens_per_step=cfg.total_batch_tokens,
                tokens_per_second=cfg.total_batch_tokens / steady,
                mfu=flops_per_step / steady / peak if peak else None, first_step_extra_s=times[0] - steady,
                peak_memory_gib=torch.cuda.max_memory_allocated(rt.device) / train_gpt.GIB
                if rt.device.type == "cuda" else None,
                estimated_memory_gib=estimate / train_gpt.GIB,
                estimated_tokens_per_second_at_40pct=train_gpt.PLAN_MFU * peak / model.flops_per_token()
                if peak else None)


def optional(value, template):
    """A figure that a CPU smoke run does not have (MFU, GPU memory) -> "n/a"."""
    return "n/a" if value is None else template.format(value)


def bench_gpu(args):
    figures = measure_gpu(args.preset, args.steps, args.device)
    print(json.dumps({"bench": "gpu", **figures}))
    header = ["preset", "device", "params", "tokens/s", "MFU", "first step extra s", "peak memory GiB",
              "estimated memory GiB", "estimated tokens/s at 40% MFU"]
    row = [figures["preset"], figures["device_name"], f"{figures['params']:,}", f"{figures['tokens_per_second']:,.0f}",
           optional(figures["mfu"], "{:.1%}"), f"{figures['first_step_extra_s']:.1f}",
           optional(figures["peak_memory_gib"], "{:.1f}"), f"{figures['estimated_memory_gib']:.1f}",
           optional(figures["estimated_tokens_per_second_at_40pct"], "{:,.0f}")]
    print_table(header, [row])
    write_section(f"gpu-{args.preset}", f"""
## Pretraining step on a GPU: the `{args.preset}` preset, measured beside the plan

`python bench.py gpu --preset {args.preset} --steps {args.steps}` — {machine()}. {args.steps} optimizer steps of
train_gpt.train_step on random tokens (compiled, bf16 autocast), one device; tokens/s and MFU of the median
step; "first step extra" is the first step's time beyond the median (mostly compilation). The estimates are
the dry-run's (`python train_gpt.py --preset {args.preset} --dry-run --plan-gpus 1`).

{markdown_table(header, [row])}
""")


# ----------------------------------------------------------------------------------------------------
# bench.py rl

def measure_rl(checkpoint=os.path.join("out", "sft"), steps=5, **overrides):
    """`steps` RL steps of the tiny preset (any RLConfig field overridden) -> the figures as a dict. The first
    step is left out of the averages: it pays for cold caches and memory allocation."""
    cfg = rl.RLConfig(checkpoint=checkpoint, num_steps=steps + 1, show_every=0, **overrides)
    learner = rl.make_learner(cfg)
    problems = rl.practice_set(cfg, cfg.num_steps * cfg.problems_per_step, "train")
    rows = [rl.rl_step(step, problems[step * cfg.problems_per_step:(step + 1) * cfg.problems_per_step], learner, cfg)[0]
            for step in range(cfg.num_steps)][1:]
    attempts = cfg.problems_per_step * cfg.samples
    sample_s = sum(r["sample_s"] for r in rows)
    learn_s = sum(r["learn_s"] for r in rows)
    return dict(
        checkpoint=checkpoint, device=str(learner.rt.device), algo=cfg.algo, attempts_per_step=attempts,
        mean_response_tokens=sum(r["length"] for r in rows) / len(rows),
        rollout_tokens_per_second=sum(r["length"] * attempts for r in rows) / sample_s,
        sample_seconds_per_step=sample_s / len(rows), learn_seconds_per_step=learn_s / len(rows),
        sampling_share=sample_s / (sample_s + learn_s), steps_timed=len(rows),
    )


def bench_rl(args):
    figures = measure_rl(args.checkpoint, args.steps)
    print(json.dumps({"bench": "rl", **figures}))
    header = ["attempts/step", "mean response tokens", "rollout tok/s", "sampling s/step", "learning s/step",
              "sampling share"]
    row = [figures["attempts_per_step"], f"{figures['mean_response_tokens']:.1f}",
           f"{figures['rollout_tokens_per_second']:,.0f}", f"{figures['sample_seconds_per_step']:.2f}",
           f"{figures['learn_seconds_per_step']:.2f}", f"{figures['sampling_share']:.0%}"]
    print_table(header, [row])
    write_section("rl", f"""
## RL: where a step's time goes

`python bench.py rl --checkpoint {args.checkpoint} --steps {args.steps}` — {machine()}. rl.py's own step
(`--algo {figures['algo']}`, tiny-preset defaults), the first step left out of the averages.

{markdown_table(header, [row])}
""")


# ----------------------------------------------------------------------------------------------------
# bench.py infer

def decode_with_cache(model, batch, prompt_len, steps):
    """Greedy decoding the way the engine does it: prefill once, then one token per forward pass.
    -> (prefill seconds, decode seconds)."""
    from train_gpt import KVCache
    cache = KVCache(model.config, batch, "cpu")
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len))
    started = time.perf_counter()
    logits = model(prompt, kv_cache=cache)[0][:, -1]
    prefilled = time.perf_counter()
    for _ in range(steps):
        logits = model(logits.argmax(-1, keepdim=True), kv_cache=cache)[0][:, -1]
    return prefilled - started, time.perf_counter() - prefilled


def decode_by_recompute(model, batch, prompt_len, steps):
    """The naive loop: the whole sequence goes through the model again for every new token."""
    sequence = torch.randint(0, model.config.vocab_size, (batch, prompt_len))
    started = time.perf_counter()
    for _ in range(steps):
        next_ids = model(sequence)[0][:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_ids], dim=1)
    return time.perf_counter() - started


def bench_infer(args):
    from train_gpt import GPT, TrainConfig, gpt_config
    torch.manual_seed(0)
    # the tiny preset's shape (its pointer included), with a context long enough for the prompt and all
    # generated tokens
    config = gpt_config(TrainConfig(seq_len=args.prompt + max(args.tokens, args.batch_tokens)), 4096)
    model = GPT(config).eval()
    print(f"model: {config} ({model.num_params():,} parameters); machine: {machine()}")
    header = ["batch", "generated", "prefill tok/s", "decode tok/s, KV cache", "decode tok/s, recompute", "speed-up"]
    rows, figures = [], {}
    with torch.inference_mode():  # as the engine samples; the recompute loop runs under it too
        decode_with_cache(model, 1, args.prompt, 8)  # warm-up: first calls pay for allocation
        for batch, tokens in ((1, args.tokens), (32, args.batch_tokens)):
            prefill_s, cached_s = min((decode_with_cache(model, batch, args.prompt, tokens) for _ in range(2)),
                                      key=lambda pair: pair[1])
            recompute_s = decode_by_recompute(model, batch, args.prompt, tokens)
            cached, recomputed = batch * tokens / cached_s, batch * tokens / recompute_s
            rows.append([batch, tokens, f"{batch * args.prompt / prefill_s:,.0f}", f"{cached:,.0f}",
                         f"{recomputed:,.0f}", f"{cached / recomputed:.1f}x"])
            figures[f"batch_{batch}"] = {"prefill_tok_s": round(batch * args.prompt / prefill_s),
                                         "cached_tok_s": round(cached), "recompute_tok_s": round(recomputed)}
    print_table(header, rows)
    load = os.getloadavg()[0]
    print(json.dumps({"bench": "infer", "load_1min": load, "threads": torch.get_num_threads(), **figures}))
    write_section("infer", f"""
## Inference: KV cache vs recompute

`python bench.py infer --prompt {args.prompt} --tokens {args.tokens} --batch-tokens {args.batch_tokens}` —
{machine()}, float32, torch threads:
{torch.get_num_threads()}, load average {load:.1f} at the end (both loops suffer from it; their ratio is the
figure). Both loops run under `torch.inference_mode()`, as the engine samples. Model: the `tiny` shape ({config.n_layer} layers × {config.n_embd}, vocab
{config.vocab_size}, {model.num_params():,} parameters, random weights: speed does not depend on them) with a
{config.seq_len}-token context. Greedy decoding after a {args.prompt}-token prompt ({args.tokens} tokens at batch 1,
{args.batch_tokens} at batch 32, where recomputing is slow to measure); "recompute" runs the whole sequence
through the model for every new token, the KV cache one token.

{markdown_table(header, rows)}
""")


def bench_codetool(args):
    """The code tool's worker process against evaluating in this process, calls interleaved so that both
    see the same load; the ratio is the price of the hard limits."""
    import chat
    expressions = ["(869 - 177*4) / 23", "'strawberry'.count('r')", "12345678 * 87654321", "'ubiquitous'[::3]",
                   "len(sum([[0]*99]*99, []))", "[[0]*9999]*9999 == [[0]*9999]*9999"]
    chat.run_code("1")  # start the worker outside the timing, as a server does on its first call
    rows, figures = [], {}
    for src in expressions:
        inside = outside = float("inf")
        for _ in range(args.repeats):  # best of the repeats, each a batch of calls
            started = time.perf_counter()
            for _ in range(args.calls):
                chat.evaluate_expression(src)
            inside = min(inside, (time.perf_counter() - started) / args.calls)
            started = time.perf_counter()
            for _ in range(args.calls):
                chat.run_code(src)
            outside = min(outside, (time.perf_counter() - started) / args.calls)
        rows.append([f"`{src}`", f"{inside * 1e6:,.0f}", f"{outside * 1e6:,.0f}", f"{outside / inside:.1f}x"])
        figures[src] = {"in_process_us": round(inside * 1e6, 1), "worker_us": round(outside * 1e6, 1)}
    header = ["expression", "in process µs", "worker µs", "ratio"]
    print_table(header, rows)
    print(json.dumps({"bench": "codetool", "load_1min": os.getloadavg()[0], **figures}))
    write_section("codetool", f"""
## The code tool: worker process vs in-process

`python bench.py codetool --calls {args.calls} --repeats {args.repeats}` — {machine()}, load average
{os.getloadavg()[0]:.1f} while measuring (the two columns are interleaved, so their ratio is fair under load).
run_code sends each expression to one persistent forked worker (RLIMIT_AS, RLIMIT_CPU, killed after
{chat.WORKER_SECONDS:g} s wall time); "in process" calls the same evaluator directly, without those limits.
The last row is refused by the cost model (a value counted as if every alias were copied). The worker adds
a pipe round trip (about 0.1 ms) to each call: several times a trivial expression, but small against one decoding
step of the model, which a tool call always waits for anyway.

{markdown_table(header, rows)}
""")


def bench_longword(args):
    """Encoding one long "word" (a single chunk of the split regex): the heap BPE against the plain scan,
    side by side in one run; the scan is skipped where it would take minutes."""
    import tokenizer
    tok = tokenizer.Tokenizer.load(args.tokenizer)
    rng = random.Random(0)
    rows, figures = [], {}
    words = [(f"{n:,} random letters", "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n)))
             for n in (5_000, 10_000, 20_000, 40_000, 1_000_000)]
    words += [("1,000,000 × 'a'", "a" * 1_000_000), ("333,333 × 'the'", "the" * 333_333)]
    for label, word in words:
        n = len(word)
        timings = {}
        for name, threshold in (("heap", tokenizer.LONG_CHUNK_BYTES), ("scan", 10 ** 9)):
            if name == "scan" and n > 20_000:
                continue
            tokenizer.LONG_CHUNK_BYTES = threshold
            tok._cache.clear()
            wall, cpu = time.perf_counter(), time.process_time()
            ids = tok.encode(word)
            timings[name] = (time.perf_counter() - wall, time.process_time() - cpu)
            assert tok.decode(ids) == word
        tokenizer.LONG_CHUNK_BYTES = 256
        scan = timings.get("scan")
        rows.append([label, f"{timings['heap'][0]:.3f} ({timings['heap'][1]:.3f})",
                     f"{scan[0]:.3f} ({scan[1]:.3f})" if scan else "-"])
        figures[label] = {"heap_s": round(timings["heap"][0], 4), "scan_s": round(scan[0], 4) if scan else None}
    header = ["one word", "cuts + heap: wall s (CPU s)", "plain scan: wall s (CPU s)"]
    print_table(header, rows)
    print(json.dumps({"bench": "longword", "load_1min": os.getloadavg()[0], **figures}))
    write_section("longword", f"""
## Tokenizer: one long word

`python bench.py longword --tokenizer {args.tokenizer}` — {machine()}, load average {os.getloadavg()[0]:.1f}
while measuring (wall time suffers from the load; CPU time less so). A string of letters is one chunk of
the split regex, so BPE runs over all of it at once: the plain scan looks for the best pair after every
merge (quadratic). A long chunk is instead cut wherever two neighbouring bytes occur together in no token
(no merge can join them), and a piece still long goes through a heap of candidate pairs (O(n log n)); both
give the ids of the scan (test_all.py checks it, and against tiktoken). The last row is the worst case:
every pair merges, so there is nothing to cut and the heap does all the work.

{markdown_table(header, rows)}
""")


def process_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def stream_once(url, max_tokens, seed, hang_up=False):
    """One streaming chat request -> (seconds, how it ended): "done" (the stream's last event is
    `data: [DONE]`), "error event" (an error event, then [DONE]), "503" (refused with Retry-After: the
    queue was full), "hung up" (hang_up: this client closed the connection after the first bytes, as a
    closed browser tab does), or "dropped" (anything else: a reset, a stream cut short, another status)."""
    import urllib.error
    import urllib.request
    body = json.dumps({"messages": [{"role": "user", "content": "What is 2+2? Tell me a story."}], "stream": True,
                       "max_tokens": max_tokens, "seed": seed}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            if hang_up:
                response.read(50)
                return time.perf_counter() - started, "hung up"
            events = [e for e in response.read().decode().split("\n\n") if e.startswith("data: ")]
    except urllib.error.HTTPError as e:
        refused = e.code == 503 and e.headers.get("Retry-After") is not None
        return time.perf_counter() - started, "503" if refused else "dropped"
    except OSError:  # reset, timed out, or the stream ended before its chunked framing did
        return time.perf_counter() - started, "dropped"
    if not events or events[-1] != "data: [DONE]":
        return time.perf_counter() - started, "dropped"
    return time.perf_counter() - started, "error event" if any('"error"' in e for e in events) else "done"


# (name, clients, requests per client, every how many requests one hangs up (0 = none)); the server's queue holds
# chat.MAX_QUEUED waiting generations besides the running one, so 24 clients are more than it holds.
SERVE_SCENARIOS = (("streams", 16, 10, 0), ("every 2nd hangs up", 16, 10, 2), ("beyond the queue", 24, 5, 0))


def serve_scenario(url, pool, clients, requests, hang_up_every, max_tokens, seed):
    """clients threads each send `requests` streaming requests back to back -> (results, wall seconds)."""
    def client(k):
        return [stream_once(url, max_tokens, seed + k * 1000 + i,
                            hang_up=bool(hang_up_every) and (k * requests + i) % hang_up_every == 0)
                for i in range(requests)]
    started = time.perf_counter()
    results = [r for run in pool.map(client, range(clients)) for r in run]
    return results, time.perf_counter() - started


def bench_serve(args):
    """Load on the real server (`chat.py --web` in its own process), in SERVE_SCENARIOS and then a soak of
    `--soak-rounds` rounds of the first. Latency is request to [DONE], queueing included (one generation runs
    at a time, so under load a request mostly waits for the ones before it)."""
    import collections
    import concurrent.futures
    server = subprocess.Popen([sys.executable, "chat.py", "--web", "--port", "0", "--checkpoint", args.checkpoint],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    scenarios = [*SERVE_SCENARIOS, *[(f"soak round {r + 1}", 16, 10, 0) for r in range(args.soak_rounds)]]
    rows, figures = [], []
    try:
        line = server.stdout.readline()
        url = re.search(r"http://[^/]+", line).group(0) if "serving" in line else None
        if url is None:
            raise SystemExit(f"error: the server did not start: {line.strip()}")
        threading.Thread(target=server.stdout.read, daemon=True).start()  # drain the request log
        with concurrent.futures.ThreadPoolExecutor(max(c for _, c, _, _ in scenarios)) as pool:
            # warm-up, one request per client: the first calls allocate caches, thread stacks, buffers
            list(pool.map(lambda k: stream_once(url, args.max_tokens, 10 ** 6 + k), range(16)))
            for n, (name, clients, requests, hang_up_every) in enumerate(scenarios):
                rss_before = process_rss_mb(server.pid)
                results, wall = serve_scenario(url, pool, clients, requests, hang_up_every, args.max_tokens, n * 10 ** 5)
                rss_after = process_rss_mb(server.pid)
                ends = collections.Counter(end for _, end in results)
                answered = sorted(seconds for seconds, end in results if end in ("done", "error event"))
                p50, p95 = (answered[len(answered) // 2], answered[min(len(answered) - 1, int(0.95 * len(answered)))]
                            if answered else (float("nan"),) * 2)
                rows.append([name, f"{clients} × {requests}", ends["hung up"],
                             f"{ends['done']}/{len(results) - ends['hung up']}", ends["error event"], ends["503"],
                             ends["dropped"], f"{p50:.2f}", f"{p95:.2f}", f"{len(results) / wall:.2f}",
                             f"{rss_before:.0f} → {rss_after:.0f}"])
                figures.append(dict(scenario=name, clients=clients, requests=requests, **ends, p50_s=round(p50, 3),
                                    p95_s=round(p95, 3), rss_before_mb=round(rss_before, 1),
                                    rss_after_mb=round(rss_after, 1)))
    finally:
        server.terminate()
        server.wait()
    header = ["scenario", "clients × requests", "hung up", "streams ending in [DONE]", "error events",
              "503 + Retry-After", "dropped", "p50 s", "p95 s", "requests/s", "server RSS MB before → after"]
    print_table(header, rows)
    print(json.dumps({"bench": "serve", "scenarios": figures, "load_1min": os.getloadavg()[0]}))
    write_section("serve", f"""
## The web server under load

`python bench.py serve --checkpoint {args.checkpoint} --max-tokens {args.max_tokens} --soak-rounds
{args.soak_rounds}` — {machine()}, load average {os.getloadavg()[0]:.1f} while measuring (other jobs shared the
cores). `chat.py --web` runs in its own process; each client thread sends its streaming requests back to back
(up to {args.max_tokens} tokens each). One generation runs at a time, so latency is mostly queueing: about as many
generations' time as there are clients, at p50. "Hung up": the client closed the connection after the first
bytes (a closed browser tab) and at once sent its next request. "Dropped" counts every other end: a reset, a
stream without `data: [DONE]`, another status. 24 clients are more than the queue holds ({chat.MAX_QUEUED} waiting + 1
running): the rest are told 503 with Retry-After. The soak rounds repeat the first row; RSS "before" is measured
after a warm-up round of one request per client (first calls allocate caches and thread stacks).

{markdown_table(header, rows)}
""")


# ----------------------------------------------------------------------------------------------------
# bench.py threads / kernel / compile: short runs of the stages, each in its own process, measured from outside

def short_stage_commands(sft_checkpoint):
    """Each stage's script with flags for a short run of its own step: the step is the one the tiny pipeline
    runs (same batch, same model); only the number of steps and the evaluations around them are cut."""
    return {
        "pretraining": ["train_gpt.py", "--num-steps", "8", "--eval-every", "0", "--eval-tokens", "4096",
                        "--sample-every", "0", "--save-every", "0"],
        "sft": ["sft.py", "--base", os.path.join("out", "base", "model.pt"), "--num-steps", "6", "--conversations",
                "200", "--eval-prompts", "4", "--interrogate-samples", "1"],
        "rl": ["rl.py", "--checkpoint", sft_checkpoint, "--num-steps", "3", "--eval-problems", "8", "--pass-k", "2"],
    }


# The stage runs in a child process that first sets train_gpt.KEEP_FREED_MEMORY, then does what the script's
# `if __name__ == "__main__": run_cli(main)` does (run_cli applies the policy).
STAGE_RUNNER = ("import importlib, sys, train_gpt; train_gpt.KEEP_FREED_MEMORY = sys.argv.pop(1) == 'on'; "
                "sys.argv.pop(0); train_gpt.run_cli(importlib.import_module(sys.argv[0].removesuffix('.py')).main)")


def step_seconds(row):
    """A log row's step time: pretraining and SFT log dt, RL its sampling and learning separately."""
    return row["dt"] if "dt" in row else row["sample_s"] + row["learn_s"]


def run_stage(command, out_dir, threads=1, load="quiet", keep_freed=True, extra=()):
    """One short stage run in its own process -> its figures: wall, CPU user/sys seconds, minor page faults,
    peak memory (from wait4's rusage: the child alone), the median step time (the first step left out: it
    pays for warm-up) and the logged training trajectory (losses; RL: rewards and KL) to compare runs by."""
    os.makedirs(out_dir, exist_ok=True)
    argv = [sys.executable, "-c", STAGE_RUNNER, "on" if keep_freed else "off", *command, "--out-dir", out_dir,
            "--threads", str(threads), *extra]
    with beside(load), open(os.path.join(out_dir, "stdout.txt"), "w") as stdout:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=HERE, stdout=stdout, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"error: {' '.join(command)} failed (exit status {status}); see {out_dir}/stdout.txt")
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        rows = [row for row in map(json.loads, f) if "dt" in row or "sample_s" in row]
    trajectory = [(row.get("loss"), row.get("reward"), row.get("kl")) for row in rows]
    return dict(wall=wall, user=usage.ru_utime, sys=usage.ru_stime, minflt=usage.ru_minflt,
                maxrss_mb=usage.ru_maxrss / 1024, step_s=statistics.median(map(step_seconds, rows[1:] or rows)),
                steps=[step_seconds(row) for row in rows], trajectory=trajectory, load_1min=os.getloadavg()[0])


def spread(values, template="{:.2f}"):
    """median (min–max) of repeated measurements."""
    values = sorted(values)
    text = template.format(statistics.median(values))
    return text if len(values) == 1 else f"{text} ({template.format(values[0])}–{template.format(values[-1])})"


def available_stages(args):
    commands = short_stage_commands(args.sft_checkpoint)
    missing = {"pretraining": None, "sft": os.path.join("out", "base", "model.pt"), "rl": args.sft_checkpoint}
    stages = [s for s in args.stages if missing[s] is None or os.path.exists(os.path.join(HERE, missing[s]))]
    for stage in set(args.stages) - set(stages):
        print(f"skipping {stage}: no checkpoint at {missing[stage]}")
    return stages, commands


THREAD_CHOICES = (1, 2, 0)  # --threads N; 0 = the stage's automatic choice (train_gpt.cpu_threads)


def thread_label(threads):
    return "auto" if threads == 0 else f"{threads}t"


def bench_threads(args):
    """Every (stage, threads, load) combination, interleaved round by round so that all of them see the same
    changes in the machine's other work; the figure is the median step time over the rounds. "auto" is the
    default policy (as many threads as idle cores when the stage starts): it should be as fast as the faster
    fixed count in both loads."""
    stages, commands = available_stages(args)
    combos = [(threads, load) for load in ("quiet", "busy") for threads in THREAD_CHOICES]
    results = {(stage, *combo): [] for stage in stages for combo in combos}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            for stage in stages:
                for threads, load in combos:
                    run = run_stage(commands[stage], os.path.join(tmp, stage), threads, load)
                    results[stage, threads, load].append(run["step_s"])
                    loads.append(run["load_1min"])
                    print(f"round {round_ + 1}: {stage}, {thread_label(threads)}, {load}: {run['step_s']:.3f} s/step "
                          f"(load average {run['load_1min']:.1f})", flush=True)
    header = ["stage", *(f"{thread_label(t)} {load} s/step" for t, load in combos),
              "auto vs best fixed, quiet", "auto vs best fixed, busy"]
    rows, figures = [], {}
    for stage in stages:
        med = {combo: statistics.median(results[(stage, *combo)]) for combo in combos}
        versus = [f"{min(med[1, load], med[2, load]) / med[0, load]:.2f}x" for load in ("quiet", "busy")]
        rows.append([stage, *(spread(results[(stage, *combo)], "{:.3f}") for combo in combos), *versus])
        figures[stage] = {f"{thread_label(t)}_{load}": [round(x, 4) for x in results[(stage, t, load)]]
                          for t, load in combos}
    print_table(header, rows)
    print(json.dumps({"bench": "threads", "repeats": args.repeats, "load_1min": loads, **figures}))
    write_section("threads", f"""
## Threads: 1, 2 or automatic, quiet and beside a busy process

`python bench.py threads --repeats {args.repeats}` — {machine()}; load average {min(loads):.1f}–{max(loads):.1f}
while measuring ("quiet" is only what the bench itself adds — nothing; "busy" adds one process burning a core,
`bench.busy_process`). Short runs of each stage's own step (`bench.short_stage_commands`), each in its own process
with `--threads N` (auto: `--threads 0`, the default, `train_gpt.cpu_threads`), the combinations interleaved round
by round; median seconds per step over {args.repeats} rounds (min–max), the first step of each run left out. "auto vs
best fixed" is the faster fixed count's step time over auto's: 1.00x means auto chose as well as the better of 1 and
2 threads; below 1x, auto was slower.

{markdown_table(header, rows)}
""")


def bench_kernel(args):
    """Each stage with and without the allocator policy (train_gpt.keep_freed_memory), one thread, alternated
    round by round: user and sys CPU seconds, minor page faults and peak memory of the child process, and a
    check that the trajectories (losses) are identical: the policy changes where memory comes from, never a
    number."""
    stages, commands = available_stages(args)
    results = {(stage, policy): [] for stage in stages for policy in ("off", "on")}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            for stage in stages:
                for policy in ("off", "on"):
                    run = run_stage(commands[stage], os.path.join(tmp, stage), keep_freed=policy == "on")
                    results[stage, policy].append(run)
                    print(f"round {round_ + 1}: {stage}, policy {policy}: user {run['user']:.1f} s, sys "
                          f"{run['sys']:.1f} s, {run['minflt']:,} minor faults, {run['maxrss_mb']:.0f} MB",
                          flush=True)
    header = ["stage", "allocator policy", "user s", "sys s", "sys / user", "minor page faults", "peak RSS MB",
              "s/step", "wall s"]
    rows, figures = [], {}
    for stage in stages:
        trajectories = {tuple(map(tuple, run["trajectory"]))
                        for policy in ("off", "on") for run in results[stage, policy]}
        if len(trajectories) != 1:
            raise AssertionError(f"{stage}: the allocator policy changed the logged losses")
        for policy in ("off", "on"):
            runs = results[stage, policy]
            column = lambda key, template: spread([r[key] for r in runs], template)
            rows.append([stage, policy, column("user", "{:.1f}"), column("sys", "{:.1f}"),
                         spread([r["sys"] / r["user"] for r in runs], "{:.0%}"), column("minflt", "{:,.0f}"),
                         column("maxrss_mb", "{:.0f}"), column("step_s", "{:.3f}"), column("wall", "{:.1f}")])
            figures[f"{stage}_{policy}"] = {key: [round(r[key], 3) for r in runs]
                                            for key in ("user", "sys", "minflt", "maxrss_mb", "step_s", "wall")}
    print_table(header, rows)
    print(json.dumps({"bench": "kernel", "repeats": args.repeats, **figures}))
    write_section("kernel", f"""
## Kernel time: the allocator policy

`python bench.py kernel --repeats {args.repeats}` — {machine()}; load average {os.getloadavg()[0]:.1f} at the end
(other jobs shared the machine: wall and step times suffer from it, CPU seconds and page faults much less). The
short runs of `bench.py threads`, one thread, with `train_gpt.KEEP_FREED_MEMORY` off (glibc's default: blocks above
32 MiB mapped fresh from the kernel and returned on free) and on (`train_gpt.keep_freed_memory`: M_MMAP_MAX = 0,
M_TRIM_THRESHOLD = 2 GiB), alternated round by round; median (min–max) over {args.repeats} rounds, of the child
process alone (wait4). The logged losses (RL: rewards and KL) are identical with and without (checked by the bench).

{markdown_table(header, rows)}
""")


def bench_compile(args):
    """Pretraining at the tiny preset with --compile on and off, same seed, alternated: the first step's extra
    time (compilation) against the saving per later step, and how many steps it takes to pay back."""
    runs = {"off": [], "on": []}
    command = ["train_gpt.py", "--num-steps", str(args.steps), "--eval-every", "0", "--eval-tokens", "4096",
               "--sample-every", "0", "--save-every", "0"]
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            for mode in ("off", "on"):
                run = run_stage(command, os.path.join(tmp, mode), extra=("--compile", mode))
                runs[mode].append(run)
                print(f"round {round_ + 1}: compile {mode}: first step {run['steps'][0]:.1f} s, then "
                      f"{run['step_s']:.3f} s/step, wall {run['wall']:.1f} s", flush=True)
    steady = {mode: statistics.median(r["step_s"] for r in runs[mode]) for mode in runs}
    first = {mode: statistics.median(r["steps"][0] for r in runs[mode]) for mode in runs}
    saving, extra = steady["off"] - steady["on"], first["on"] - first["off"]
    full_steps = train_gpt.TrainConfig().num_steps
    payback = extra / saving if saving > 0 else None
    same = runs["on"][0]["trajectory"] == runs["off"][0]["trajectory"]
    header = ["compile", "first step s", "later steps s/step", "wall s"]
    rows = [[mode, spread([r["steps"][0] for r in runs[mode]], "{:.1f}"),
             spread([r["step_s"] for r in runs[mode]], "{:.3f}"), spread([r["wall"] for r in runs[mode]], "{:.1f}")]
            for mode in ("off", "on")]
    print_table(header, rows)
    verdict = f"pays back after {payback:.0f} steps" if payback is not None else "never pays back (no faster per step)"
    net = saving * (full_steps - 1) - extra
    print(f"compile: +{extra:.1f} s once, {saving:+.3f} s per later step: {verdict}; over a full tiny run "
          f"({full_steps} steps) {net:+.0f} s saved; losses identical: {same}")
    print(json.dumps({"bench": "compile", "steps": args.steps, "repeats": args.repeats, "first_step_s": first,
                      "step_s": steady, "payback_steps": payback, "full_run_saving_s": net, "identical_losses": same}))
    write_section("compile", f"""
## torch.compile on the CPU, tiny preset

`python bench.py compile --steps {args.steps} --repeats {args.repeats}` — {machine()}, one thread, load average
{os.getloadavg()[0]:.1f} at the end (other jobs shared the machine). Short pretraining runs with `--compile on` and
`--compile off`, same seed, alternated; medians (min–max) over {args.repeats} rounds. The first step includes the
compilation. Compiling costs {extra:.1f} s once and changes a later step by {-saving:+.3f} s: it {verdict};
over a full tiny run ({full_steps} steps) that is {net:+.0f} s saved (negative: lost). Losses identical with
and without: {same} (compiled kernels fuse and reorder floating-point operations, so small differences are expected).

{markdown_table(header, rows)}
""")


# ----------------------------------------------------------------------------------------------------
# bench.py pipeline: the README's first command, timed, quiet and beside a busy process

def clean_copy(dest):
    """The files git tracks (what a fresh clone has), as they are in this working tree, copied to dest: run.sh
    writes under its own folder's out/, so running it in a copy leaves this checkout's out/ untouched."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=HERE, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if os.path.isfile(os.path.join(HERE, name)):
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            shutil.copy2(os.path.join(HERE, name), os.path.join(dest, name))


def run_pipeline(folder, load):
    """`bash run.sh --fresh` in a clean copy at folder -> wall seconds, each `=== stage` section's seconds
    (timed from the lines run.sh prints as each begins), and the output's tail. Stage flags come from the
    environment (BASE_ARGS, SFT_ARGS, ...), as for run.sh itself."""
    clean_copy(folder)
    sections, lines = [], []
    with beside(load):
        started = time.perf_counter()
        proc = subprocess.Popen(["bash", "run.sh", "--fresh"], cwd=folder, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("=== "):
                sections.append([line[4:].split(":")[0], time.perf_counter()])
        proc.wait()
        wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"error: run.sh ({load}) failed with exit status {proc.returncode}:\n{''.join(lines[-20:])}")
    ends = [t for _, t in sections[1:]] + [started + wall]
    seconds = {}
    for (name, begun), end in zip(sections, ends):  # a stage name can repeat (data): add its sections up
        seconds[name] = seconds.get(name, 0.0) + end - begun
    figures = {}
    for stage, keys in PIPELINE_FIGURES.items():
        with open(os.path.join(folder, "out", stage, "metrics.json")) as f:
            metrics = json.load(f)
        figures.update({f"{stage} {key}": metrics[key] for key in keys})
    return dict(wall=wall, stages=seconds, figures=figures, load_1min=os.getloadavg()[0])


# what each stage achieved, beside the times (a faster pipeline must still reach its bars)
PIPELINE_FIGURES = {"base": ("val_bpb",), "sft": ("format_rate",), "rl": ("pass1_before", "pass1_after"),
                    "rlhf": ("rm_pair_accuracy", "true_reward_final", "hack_true_final")}


SMOKE_VARIABLES = ("BASE_ARGS", "SFT_ARGS", "RL_ARGS", "RLHF_ARGS", "HACK_ARGS", "EVALS_ARGS")


def bench_pipeline(args):
    results = {}
    work = args.work_dir or tempfile.mkdtemp(prefix="scratchgpt-pipeline-")
    for load in args.runs:
        folder = os.path.join(work, load)
        shutil.rmtree(folder, ignore_errors=True)
        print(f"run.sh --fresh ({load}) in {folder} ...", flush=True)
        results[load] = run_pipeline(folder, load)
        print(f"  {results[load]['wall']:.0f} s", flush=True)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    stages = list(dict.fromkeys(name for r in results.values() for name in r["stages"]))
    header = ["run", "wall", *stages]
    rows = [[load, train_gpt.fmt_time(r["wall"]), *(f"{r['stages'].get(name, 0):.0f}" for name in stages)]
            for load, r in results.items()]
    print_table(header, rows)
    figure_names = list(next(iter(results.values()))["figures"])
    figure_rows = [[load, *(f"{r['figures'][name]:.4g}" for name in figure_names)] for load, r in results.items()]
    print_table(["run", *figure_names], figure_rows)
    flags = {name: os.environ[name] for name in SMOKE_VARIABLES if os.environ.get(name)}
    print(json.dumps({"bench": "pipeline", **results, "stage_flags": flags}))
    sized = ("at smoke size, with " + ", ".join(f"{k}=\"{v}\"" for k, v in flags.items())) if flags else "in full"
    write_section("pipeline", f"""
## The whole tiny pipeline: `bash run.sh --fresh`, quiet and beside a busy process

`python bench.py pipeline` — {machine()}; the pipeline {sized}, in a clean copy of the repository (its
tokenizer and shards built afresh, as in a new clone), once per row: "quiet" with nothing added by the bench,
"busy" beside one process burning a core (`bench.busy_process`). Load average at the end of each:
{", ".join(f"{load} {r['load_1min']:.1f}" for load, r in results.items())}. Seconds per section of run.sh's output
(each `=== name` line to the next), then what each stage reached (its metrics.json).

{markdown_table(header, rows)}

{markdown_table(["run", *figure_names], figure_rows)}
""")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenizer", help="train and encode speed against the peers")
    tok.add_argument("--corpus", default=os.path.join(SHARED_CORPUS, "gutenberg_20mb.txt"))
    tok.add_argument("--heldout", default=os.path.join(SHARED_CORPUS, "heldout_milton.txt"))
    tok.add_argument("--repeats", type=int, default=2)
    tok.set_defaults(run=bench_tokenizer)
    gpu = sub.add_parser("gpu", help="a GPU preset's training step: tokens/s, MFU, memory, compile time vs the plan")
    gpu.add_argument("--preset", default="d12")
    gpu.add_argument("--steps", type=int, default=300)
    gpu.add_argument("--device", default="auto", help="cuda (auto), or cpu for a smoke run")
    gpu.set_defaults(run=bench_gpu)
    scale = sub.add_parser("tokenizer-scale", help="training at the GPU vocabulary, extrapolated to the GPU slice")
    scale.add_argument("--corpus", default=os.path.join(SHARED_CORPUS, "gutenberg_20mb.txt"))
    scale.add_argument("--vocab-size", type=int, default=32768)
    scale.set_defaults(run=bench_tokenizer_scale)
    digits = sub.add_parser("digits", help="compare digit groupings of the split regex")
    digits.add_argument("--vocab-size", type=int, default=4096)
    digits.set_defaults(run=bench_digits)
    data_bench = sub.add_parser("data", help="tokenizing into shards, and the filter funnel, 1 vs 2 processes")
    data_bench.add_argument("--repeats", type=int, default=3)
    data_bench.add_argument("--part", choices=["all", "tokenize", "funnel"], default="all",
                            help="measure only one of the two (each rewrites its own section)")
    data_bench.set_defaults(run=bench_data)
    train = sub.add_parser("train", help="a full pretraining run: tokens/s, MFU, memory, time to a val bpb")
    train.add_argument("--preset", default="tiny")
    train.add_argument("--target-bpb", type=float, default=2.2)
    train.set_defaults(run=bench_train)
    rl_bench = sub.add_parser("rl", help="RL step time: sampling (rollout tok/s) vs learning")
    rl_bench.add_argument("--checkpoint", default=os.path.join("out", "sft"))
    rl_bench.add_argument("--steps", type=int, default=5)
    rl_bench.set_defaults(run=bench_rl)
    infer = sub.add_parser("infer", help="KV-cache decoding against recompute")
    infer.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    infer.add_argument("--tokens", type=int, default=512, help="generated tokens at batch 1")
    infer.add_argument("--batch-tokens", type=int, default=128, help="generated tokens at batch 32")
    infer.set_defaults(run=bench_infer)
    codetool = sub.add_parser("codetool", help="the code tool's worker process against in-process evaluation")
    codetool.add_argument("--calls", type=int, default=200)
    codetool.add_argument("--repeats", type=int, default=5)
    codetool.set_defaults(run=bench_codetool)
    longword = sub.add_parser("longword", help="encoding one long word: heap BPE against the plain scan")
    longword.add_argument("--tokenizer", default=os.path.join("out", "tokenizer", "tokenizer.json"))
    longword.set_defaults(run=bench_longword)
    serve = sub.add_parser("serve", help="concurrent streaming clients (hanging up, beyond the queue, a soak) against chat.py --web")
    serve.add_argument("--checkpoint", default=os.path.join("out", "sft"))
    serve.add_argument("--max-tokens", type=int, default=32)
    serve.add_argument("--soak-rounds", type=int, default=3, help="rounds of 16 x 10 streams after the scenarios")
    serve.set_defaults(run=bench_serve)
    yard = sub.add_parser("yardstick", help="a fixed small torch workload: how fast this machine is today")
    yard.set_defaults(run=bench_yardstick)
    for name, run, help_text in (
            ("threads", bench_threads, "stages at 1, 2 and automatic threads, quiet and beside a busy process"),
            ("kernel", bench_kernel, "user/sys time and page faults with and without the allocator policy")):
        stage_bench = sub.add_parser(name, help=help_text)
        stage_bench.add_argument("--repeats", type=int, default=3)
        stage_bench.add_argument("--stages", nargs="+", choices=["pretraining", "sft", "rl"],
                                 default=["pretraining", "sft", "rl"])
        stage_bench.add_argument("--sft-checkpoint", default=os.path.join("out", "sft"), help="RL starts from it")
        stage_bench.set_defaults(run=run)
    compile_bench = sub.add_parser("compile", help="torch.compile on the CPU: compile time vs per-step saving")
    compile_bench.add_argument("--steps", type=int, default=20)
    compile_bench.add_argument("--repeats", type=int, default=2)
    compile_bench.set_defaults(run=bench_compile)
    pipeline = sub.add_parser("pipeline", help="bash run.sh --fresh in a clean copy, quiet and beside a busy process")
    pipeline.add_argument("--runs", nargs="+", choices=["quiet", "busy"], default=["quiet", "busy"])
    pipeline.add_argument("--work-dir", default="", help="where the clean copies go (kept); default: a temporary "
                                                         "folder, removed afterwards")
    pipeline.set_defaults(run=bench_pipeline)
    args = parser.parse_args()
    for name in ("corpus", "heldout"):
        path = getattr(args, name, None)
        if path is not None and not os.path.isfile(path):
            print(f"error: --{name} {path}: no such file", file=sys.stderr)
            sys.exit(2)
    if args.command != "yardstick":  # every timing is printed beside how fast the machine is today
        print(yardstick_line(), flush=True)
    args.run(args)


if __name__ == "__main__":
    main()
