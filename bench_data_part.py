"""bench_data(): how fast data.py turns the embedded corpus into token shards, on 1 and on 2 processes.
To be folded into bench.py (which already has best_time and print_table)."""
import json
import os
import resource
import tempfile

import data
from bench import best_time, print_table


def cpu_seconds():
    """CPU time used so far by this process and its finished children (the tokenizer's worker pools)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_data(repeats=3):
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


if __name__ == "__main__":
    print(json.dumps(bench_data()))
