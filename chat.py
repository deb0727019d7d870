"""
chat.py -- talking to the model: the inference engine, its tools, and the ways people reach it.

Chatting is pure inference. The weights are frozen; the only thing that changes is the context window, a
token sequence in the protocol of tokenizer.py. The engine renders the conversation, lets the model
continue it after `<|im_start|>assistant<|im_sep|>` one sampled token at a time (keeping every earlier
token's keys and values in a KV cache, so each new token costs one small forward pass), and stops at
`<|im_end|>`.

Tools. A model cannot count the dots in "....." (a handful of tokens) or multiply big numbers in one
token's worth of compute, and it cannot know what it never read. So it learned (in sft.py) to write
`<|code_start|>expr<|code_end|>` or `<|search_start|>query<|search_end|>`; when the engine sees the
closing token it pauses, runs the tool, pastes the answer in as `<|output_start|>result<|output_end|>`,
and lets the model go on, now with the answer in its working memory. The code tool here is a small,
bounded expression language interpreted from Python's syntax tree -- never `eval` -- and the search tool
ranks passages of a local folder with BM25.
"""
import ast
import contextlib
import http.server
import itertools
import json
import math
import multiprocessing
import operator
import os
import random
import re
import resource
import select
import signal
import socket
import threading
import time
import urllib.parse
import uuid
import warnings
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field

import numpy as np
import torch

from tokenizer import TOOL_CALLS, TOOL_OUTPUT, render_conversation, render_for_completion, render_tokens, use_colour
import data
from train_gpt import (KVCache, TrainConfig, UserError, build_optimizers, load_checkpoint, opt, parse_config,
                       require_positive, run_cli, sample_next, sampling_bytes, setup_runtime)

# ====================================================================================================
# The code tool: a safe evaluator for small Python expressions
# ====================================================================================================

# Bounds. A model's tool call is untrusted input: whatever it writes must finish fast, in little memory.
MAX_SOURCE_CHARS = 2000     # the expression itself
MAX_DEPTH = 40              # nesting of the syntax tree
MAX_STEPS = 10_000          # evaluated nodes
MAX_SECONDS = 0.5           # wall time, checked between nodes
MAX_INT_BITS = 4096         # about 1,233 decimal digits
MAX_STR_CHARS = 100_000     # any string value, and anything str() or the answer would print
MAX_ITEMS = 10_000          # any list/tuple value
MAX_VALUE_COST = 1_000_000  # any value, as the characters it would print with every shared part copied
MAX_EXPONENT = 10_000
# The hard limits, enforced from outside the interpreter: they hold even when one C-level operation runs
# for minutes or allocates gigabytes, where the checks between nodes above never get a chance to run.
WORKER_SECONDS = 2.0                # wall time of one call, after which the worker process is killed
WORKER_MEMORY_BYTES = 512 << 20     # address space the worker may add to what it inherited

BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY_OPS = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
COMPARE_OPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
               ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
               ast.NotIn: lambda a, b: a not in b}
def bounded_round(number, digits=0):
    """round(), but with few digits: round(x, -10**9) would compute 10**(10**9) first."""
    if not isinstance(digits, int) or abs(digits) > 100:
        raise ToolError("round() takes at most 100 digits")
    return round(number, digits)


def bounded_str(value=""):
    """str(), refused before it runs when the text would be too long: str([[1] * 9999] * 9999) is
    only two lists in memory but would print 300 million characters."""
    if isinstance(value, str):
        return value
    if value_cost(value) > MAX_STR_CHARS:
        raise ToolError("the text of this value would be too long")
    return str(value)


def bounded_sum(items, start=0):
    """sum(), with lists and tuples joined in one pass. Python's sum adds them one at a time, copying the
    growing result each time (quadratic), so sum([[0] * 9999] * 9999, []) would copy 10**11 items."""
    if not isinstance(items, (list, tuple)):
        raise ToolError("sum() takes a list or tuple")
    if not isinstance(start, (list, tuple)):
        return sum(items, start)  # numbers: linear; Python itself refuses strings and mixed types
    if not all(type(item) is type(start) for item in items):
        raise ToolError(f"sum() with a {type(start).__name__} start adds only {type(start).__name__}s")
    if len(start) + sum(map(len, items)) > MAX_ITEMS:
        raise ToolError("the list is too long")
    return type(start)(itertools.chain(start, *items))


FUNCTIONS = {"len": len, "abs": abs, "round": bounded_round, "min": min, "max": max, "sum": bounded_sum,
             "int": int, "float": float, "str": bounded_str, "sqrt": math.sqrt}
STRING_METHODS = {"count", "upper", "lower", "replace", "split", "strip", "find", "startswith", "endswith"}


class ToolError(Exception):
    """Anything the code tool refuses or fails at; its message goes back to the model as text."""


class SafeEvaluator:
    """Walks the syntax tree of one expression, node by node, allowing only what is listed above. Every
    value is checked against the bounds before it can grow: `"a" * 10**9` is refused before the string
    exists, `9 ** 9 ** 9` before the power is computed."""

    def __init__(self):
        self.steps = 0
        self.deadline = time.monotonic() + MAX_SECONDS

    def eval(self, node, depth=0):
        self.steps += 1
        if self.steps > MAX_STEPS or time.monotonic() > self.deadline:
            raise ToolError("the expression takes too long")
        if depth > MAX_DEPTH:
            raise ToolError("the expression is nested too deeply")
        handler = getattr(self, "eval_" + type(node).__name__, None)
        if handler is None:
            raise ToolError(f"{type(node).__name__} is not allowed")
        return check_size(handler(node, depth + 1))

    def eval_Expression(self, node, depth):
        return self.eval(node.body, depth)

    def eval_Constant(self, node, depth):
        if isinstance(node.value, (bool, int, float, str)):
            return node.value
        raise ToolError(f"constant {node.value!r} is not allowed")

    def eval_Name(self, node, depth):
        raise ToolError(f"unknown name {node.id!r}: there are no variables, write the values in")

    def eval_List(self, node, depth):
        return [self.eval(item, depth) for item in node.elts]

    def eval_Tuple(self, node, depth):
        return tuple(self.eval(item, depth) for item in node.elts)

    def eval_UnaryOp(self, node, depth):
        if type(node.op) not in UNARY_OPS:
            raise ToolError(f"operator {type(node.op).__name__} is not allowed")
        return UNARY_OPS[type(node.op)](self.eval(node.operand, depth))

    def eval_BinOp(self, node, depth):
        if type(node.op) not in BINARY_OPS:
            raise ToolError(f"operator {type(node.op).__name__} is not allowed")
        left, right = self.eval(node.left, depth), self.eval(node.right, depth)
        check_binary_cost(node.op, left, right)
        return BINARY_OPS[type(node.op)](left, right)

    def eval_BoolOp(self, node, depth):
        value = self.eval(node.values[0], depth)
        for item in node.values[1:]:
            if isinstance(node.op, ast.And) != bool(value):  # `and` stops at falsy, `or` at truthy
                return value
            value = self.eval(item, depth)
        return value

    def eval_Compare(self, node, depth):
        left = self.eval(node.left, depth)
        for op, right_node in zip(node.ops, node.comparators):
            if type(op) not in COMPARE_OPS:
                raise ToolError(f"comparison {type(op).__name__} is not allowed")
            right = self.eval(right_node, depth)
            if not COMPARE_OPS[type(op)](left, right):
                return False
            left = right
        return True

    def eval_Subscript(self, node, depth):
        value = self.eval(node.value, depth)
        if not isinstance(value, (str, list, tuple)):
            raise ToolError(f"cannot index a {type(value).__name__}")
        return value[self.eval(node.slice, depth)]

    def eval_Slice(self, node, depth):
        parts = [None if part is None else self.eval(part, depth) for part in (node.lower, node.upper, node.step)]
        if not all(part is None or isinstance(part, int) for part in parts):
            raise ToolError("slice bounds must be whole numbers")
        return slice(*parts)

    def eval_Call(self, node, depth):
        if node.keywords:
            raise ToolError("keyword arguments are not allowed")
        args = [self.eval(arg, depth) for arg in node.args]
        if isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
            return FUNCTIONS[node.func.id](*args)
        if isinstance(node.func, ast.Attribute) and node.func.attr in STRING_METHODS:
            target = self.eval(node.func.value, depth)
            if not isinstance(target, str):
                raise ToolError(f".{node.func.attr}() only works on strings here")
            if node.func.attr == "replace" and len(args) == 2 and isinstance(args[1], str):
                growth = len(args[1]) * (target.count(args[0]) if args[0] else len(target) + 1)
                if len(target) + growth > MAX_STR_CHARS:
                    raise ToolError("the string would be too long")
            return getattr(target, node.func.attr)(*args)
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "?")
        raise ToolError(f"function {name}() is not available; allowed: {', '.join(sorted(FUNCTIONS))} and "
                        f"string methods {', '.join(sorted(STRING_METHODS))}")


ALLOWED_NODES = (ast.Expression, ast.Constant, ast.List, ast.Tuple, ast.UnaryOp, ast.BinOp, ast.BoolOp,
                 ast.Compare, ast.Subscript, ast.Slice, ast.Call, ast.Attribute, ast.Name, ast.Load,
                 ast.operator, ast.unaryop, ast.cmpop, ast.boolop)


def check_constructs(tree):
    """Refuse the whole expression up front if any part of it is outside the language, even a part
    that evaluation would never reach (`1 < 0 < __import__('os')`)."""
    for node in ast.walk(tree):
        if not isinstance(node, ALLOWED_NODES):
            raise ToolError(f"{type(node).__name__} is not allowed")
        if isinstance(node, ast.Name) and node.id not in FUNCTIONS:
            raise ToolError(f"unknown name {node.id!r}: there are no variables, write the values in")
        if isinstance(node, ast.Attribute) and node.attr not in STRING_METHODS:
            raise ToolError(f"attribute .{node.attr} is not allowed")


def check_binary_cost(op, left, right):
    """Refuse an operation whose result would be too big, before computing it."""
    if isinstance(op, ast.Mod) and isinstance(left, str):  # '%0*d' % (10**9, 1) is a gigabyte of zeros
        raise ToolError("string formatting with % is not allowed")
    if isinstance(op, ast.Pow) and isinstance(left, int) and isinstance(right, int):
        if right > MAX_EXPONENT or (abs(left) > 1 and right * abs(left).bit_length() > MAX_INT_BITS):
            raise ToolError("the power is too large")
    if isinstance(op, ast.Add) and isinstance(left, (str, list, tuple)) and type(left) is type(right):
        if len(left) + len(right) > (MAX_STR_CHARS if isinstance(left, str) else MAX_ITEMS):
            raise ToolError("the joined string or list would be too long")
    if isinstance(op, ast.Mult):
        sequence, count = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
        if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
            if len(sequence) * max(count, 0) > MAX_STR_CHARS:
                raise ToolError("the repeated string or list would be too long")
        elif isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise ToolError("the product is too large")


def value_cost(value, memo=None):
    """About how many characters repr(value) prints: the size of the value as if every shared part were
    copied, computed without copying. [[0] * 9999] * 9999 is one inner list referenced 9999 times (80 kB
    in memory), but str(), ==, `in`, sum() and max() all walk it as 10**8 items. The cost of each list or
    tuple is remembered by identity (`memo`), so a shared part is measured once: the time is linear in
    the distinct objects, never in the copied size."""
    if isinstance(value, str):
        return len(value) + 4  # quotes and ", "
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
        return 24  # the longest float repr, -1.2345678901234567e-308; bools, slices and None are shorter
    if isinstance(value, int):
        return value.bit_length() * 3 // 10 + 3  # decimal digits (log10 2 ~ 0.3), sign and ", "
    memo = {} if memo is None else memo
    if id(value) not in memo:  # `value` is alive while we measure it, so its parts' ids stay unique
        memo[id(value)] = 2 + sum(value_cost(item, memo) for item in value)
    return memo[id(value)]


def check_size(value):
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ToolError("the number is too large")
    if isinstance(value, str) and len(value) > MAX_STR_CHARS:
        raise ToolError("the string is too long")
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_ITEMS:
            raise ToolError("the list is too long")
        if value_cost(value) > MAX_VALUE_COST:
            raise ToolError("the value is too large (counting every repeated part)")
    return value


def evaluate_expression(src):
    """The code tool inside this process: evaluate one small expression, return its value as text, or
    "Error: ..." -- never raise, whatever the model wrote. Strings come back without quotes
    ('ubiquitous'[::3] -> uqts). run_code calls this in a worker process, under hard limits."""
    try:
        if not isinstance(src, str) or len(src) > MAX_SOURCE_CHARS:
            raise ToolError(f"the expression must be a string of at most {MAX_SOURCE_CHARS} characters")
        with warnings.catch_warnings():  # "12x" would print a SyntaxWarning to the terminal mid-chat
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(src.strip(), mode="eval")
        check_constructs(tree)
        value = SafeEvaluator().eval(tree)
        return valid_text(bounded_str(value))  # str() of a number, list or tuple is its repr
    except ToolError as e:
        return valid_text(f"Error: {e}")
    except SyntaxError as e:
        return f"Error: not a valid expression ({e.msg})"
    except RecursionError:
        return "Error: the expression is nested too deeply"
    except MemoryError:
        return "Error: the expression needs too much memory"
    except Exception as e:  # ZeroDivisionError, OverflowError, TypeError, ValueError, IndexError, ...
        return valid_text(f"Error: {type(e).__name__}: {e}")


def valid_text(text):
    """Replace lone surrogates (a valid Python string, '\\ud800', that no UTF-8 can encode) by U+FFFD, so
    that whatever the tool answers can be tokenized, printed and sent as JSON."""
    return SURROGATES.sub("\ufffd", text)


SURROGATES = re.compile("[\ud800-\udfff]")


class CodeWorker:
    """Runs the code tool in a separate, persistent process, with limits no expression can defeat.

    The checks in SafeEvaluator run between syntax-tree nodes; one C-level operation that slipped past
    them (a huge str() or comparison, say) would never return control to them. So each call is sent to a
    worker process and awaited for at most `seconds`; a worker that overruns is killed and a fresh one
    forked on the next call. Inside, the worker lives under RLIMIT_AS (memory: an allocation beyond the
    limit fails with MemoryError instead of swapping the machine) and RLIMIT_CPU (the kernel kills it if
    it spins, even if this process is gone). The worker is forked, not spawned: it starts in milliseconds
    without importing torch again, and one worker serves every call, so a call costs a pipe round trip."""

    def __init__(self, evaluate, seconds=WORKER_SECONDS, memory_bytes=WORKER_MEMORY_BYTES):
        self.evaluate, self.seconds, self.memory_bytes = evaluate, seconds, memory_bytes
        self.process = self.conn = None
        self.owner = None  # the pid that forked the worker: a forked copy of this object must not use it
        self.lock = threading.Lock()  # one call at a time through the pipe (the server has many threads)

    def __call__(self, src):
        with self.lock:
            if self.process is None or self.owner != os.getpid() or not self.process.is_alive():
                self.start()
            try:
                self.conn.send(src)
                if self.conn.poll(self.seconds):
                    return self.conn.recv()
                problem = "the expression takes too long"
            except (EOFError, OSError):  # the worker died: killed by RLIMIT_CPU, or out of memory
                problem = "the expression needs too much time or memory"
            self.stop()
            return f"Error: {problem}"

    def start(self):
        context = multiprocessing.get_context("fork")
        self.conn, child_end = context.Pipe()
        self.process = context.Process(target=worker_loop, daemon=True,
                                       args=(child_end, self.conn, self.evaluate, self.seconds, self.memory_bytes))
        self.process.start()
        child_end.close()
        self.owner = os.getpid()

    def stop(self):
        if self.owner == os.getpid():
            self.process.kill()
            self.process.join()
        self.conn.close()
        self.process = self.conn = None


def worker_loop(conn, parent_end, evaluate, seconds, memory_bytes):
    """The worker process: set its limits, then answer expressions until the parent closes the pipe."""
    parent_end.close()  # else the pipe never reports EOF when the parent dies
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the terminal chat is for the parent to handle
    page = os.sysconf("SC_PAGE_SIZE")
    try:  # Linux; elsewhere (macOS) the limit may be refused, and the wall-clock kill still applies
        inherited = int(open("/proc/self/statm").read().split()[0]) * page
        resource.setrlimit(resource.RLIMIT_AS, (inherited + memory_bytes, resource.RLIM_INFINITY))
    except (OSError, ValueError):
        pass
    while True:
        try:
            src = conn.recv()
        except EOFError:
            return
        used = resource.getrusage(resource.RUSAGE_SELF)
        cpu_limit = int(used.ru_utime + used.ru_stime + seconds) + 2
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_limit, resource.getrlimit(resource.RLIMIT_CPU)[1]))
        try:
            answer = evaluate(src)
        except MemoryError:
            answer = "Error: the expression needs too much memory"
        conn.send(answer)


CODE_WORKER = CodeWorker(evaluate_expression)


def run_code(src):
    """The code tool: the value of one small expression as text, or "Error: ..." (see evaluate_expression),
    computed in the worker process within WORKER_SECONDS and WORKER_MEMORY_BYTES."""
    return CODE_WORKER(src)


# ====================================================================================================
# The search tool: BM25 over passages of a local folder
# ====================================================================================================

WORD = re.compile(r"[a-z0-9]+")


def words_of(text):
    return WORD.findall(text.lower())


def split_passages(text, target_words=120):
    """Cut a document into passages of about `target_words` words along paragraph breaks, so a search hit
    is a readable snippet rather than a whole play."""
    passages, current, size = [], [], 0
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        current.append(paragraph)
        size += len(paragraph.split())
        if size >= target_words:
            passages.append("\n".join(current))
            current, size = [], 0
    if current:
        passages.append("\n".join(current))
    return passages


class Search:
    """BM25, the classic ranking function of search engines: a passage scores for each query word it
    contains, more for rare words (inverse document frequency) and with diminishing returns for repeats
    (k1), normalised for passage length (b). Each word's postings (the passages that hold it, and how often)
    are numpy arrays, so scoring a common word touches thousands of passages in one vectorised step."""

    def __init__(self, folder=None, k1=1.5, b=0.75):
        self.k1, self.b = k1, b
        self.passages = []  # (source, text)
        for source, text in documents_in(folder):
            self.passages += [(source, passage) for passage in split_passages(text)]
        postings, lengths = defaultdict(list), []
        for i, (_, text) in enumerate(self.passages):
            counts = Counter(words_of(text))
            lengths.append(sum(counts.values()))
            for word, count in counts.items():
                postings[word].append((i, count))
        # word -> (passage indices, counts in those passages)
        self.postings = {word: tuple(np.array(column) for column in zip(*pairs)) for word, pairs in postings.items()}
        mean_length = sum(lengths) / max(1, len(lengths))
        # the length normalisation of each passage (a passage of mean length: k1)
        self.norm = k1 * (1 - b + (b * np.array(lengths, dtype=np.float64) / mean_length if mean_length else 0))

    def idf(self, word):
        df = len(self.postings[word][0]) if word in self.postings else 0  # passages that hold the word
        return math.log(1 + (len(self.passages) - df + 0.5) / (df + 0.5))

    def query(self, q, k=3):
        """The k best passages for query q: a list of dicts with source, text and score (highest first;
        equal scores in passage order). Only passages holding a query word score at all."""
        scores = np.zeros(len(self.passages))
        for word in set(words_of(q)):
            if word in self.postings:
                where, count = self.postings[word]
                scores[where] += self.idf(word) * count * (self.k1 + 1) / (count + self.norm[where])
        hits = np.flatnonzero(scores)
        best = hits[np.lexsort((hits, -scores[hits]))][:k]  # by score, then by passage index
        return [{"source": self.passages[i][0], "text": self.passages[i][1], "score": float(scores[i])}
                for i in best.tolist()]


def documents_in(folder):
    """(source, text) pairs: the .txt/.md files of a folder, or the embedded corpus when folder is None."""
    if folder is None:
        for split in data.EMBEDDED_SPLITS:
            for n, text in enumerate(data.embedded_documents(split)):
                yield f"embedded-{split}-{n}", text
        return
    if not os.path.isdir(folder):
        raise ValueError(f"search folder {folder} does not exist")
    for name in sorted(os.listdir(folder)):
        if name.endswith((".txt", ".md")):
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                yield name, f.read()


def format_search_results(results, max_chars=600):
    """What the engine pastes into the context: the snippets, each cut to max_chars."""
    if not results:
        return "No results."
    return "\n\n".join(f"[{r['source']}] {r['text'][:max_chars]}" for r in results)


# ====================================================================================================
# The engine: batched KV-cache sampling with a tool-call state machine
# ====================================================================================================

MAX_TOOL_OUTPUT_TOKENS = 128  # a tool's answer is cut to this many tokens before it enters the context


def tool_output_tokens(tok, result):
    """What the engine pastes between <|output_start|> and <|output_end|> for a tool's `result` (text): its
    tokens, cut to MAX_TOOL_OUTPUT_TOKENS. SFT's search rows and the working-memory demo paste the same."""
    return tok.encode_ordinary(result)[:MAX_TOOL_OUTPUT_TOKENS]


# Copying. The lecture's tool prompts ("How many dots are here? .......", "How many r's in strawberry?")
# only work if the model copies the user's text into the code call exactly; one dot too many and the tool
# counts the wrong thing. Copying a run of 37 identical dot tokens, knowing where to stop, is what a tiny
# model does worst (attention finds "the token after this one" by content, and every dot looks the same).
# The training data marks a copy: a string literal that opens with a quote and a space, `' strawberry '`
# (data.quoted); the model's likeliest token after a quote says whether it means one (a space) or an
# ordinary literal like `'e'`. Inside a copy, the engine lets the model write only whole words (or a whole
# run of dots) of the prompt's last user message, the way grammar-constrained decoding keeps JSON valid:
# the model still decides to call the tool, which words it copies and where the copy closes; the engine
# only rules out text the message does not hold. Two more rules of the same kind: the answer that quotes a
# tool's output (the letters of "every third letter", on a line of their own) may end only after whole words
# of it (quoting_part_of_a_word), and outside its strings a call may name only the tool's words (CODE_WORDS).
# Engine(copy_guard=False) turns all three off, so that what the model does alone can be measured (sft.py
# reports both).
COPY_CLOSE = data.COPY_CLOSE.encode()
QUOTE = ord("'")


def copy_source(prompt):
    """The bytes a copy literal may copy from: the last user message of a chat prompt (what the lecture's
    prompts ask about; the system message would offer its own words), or the whole prompt if none."""
    opening = b"<|im_start|>user<|im_sep|>"
    start = prompt.rfind(opening)
    if start < 0:
        return prompt
    message = prompt[start + len(opening):]
    return message.split(b"<|im_end|>", 1)[0]


def byte_class(byte):
    """Letters, digits and non-ASCII bytes are one class; every other byte (".", " ", "?") its own."""
    return "w" if chr(byte).isalnum() or byte >= 128 else byte


def word_bounds(source):
    """Positions 0..len(source) where a word of `source` starts or ends: a change of byte class. A copy
    quotes whole words (or a whole run of dots), so both its ends must be such a position."""
    return {0, len(source)} | {i for i in range(1, len(source)) if byte_class(source[i - 1]) != byte_class(source[i])}


def copyable(span):
    """Whether `span` may be (the start of) a copy: words and the spaces between them, or a run of one
    mark (".....", without spaces), and no quote. b"" is the start of any copy."""
    if QUOTE in span:
        return False
    if any(byte_class(b) == "w" for b in span):
        return all(byte_class(b) in ("w", ord(" ")) for b in span)
    return len(set(span)) <= 1


def quoting_part_of_a_word(line, output):
    """Whether a reply's line stops inside a word of the tool output it is quoting. The answer to "every
    third letter of explain" is the tool's `eln` written again on a line of its own, and the tiny model
    often ends its reply after `el`: so, as a copy literal closes only after whole words, a line that is
    the start of the output may end the reply only where a word of the output ends."""
    return bool(line) and output.startswith(line) and len(line) not in word_bounds(output)


# The code tool's words: it knows no variables (SafeEvaluator), so outside a string literal every name in
# a call is one of its functions, string methods or Python's word operators. The engine holds the model to
# that, as grammar-constrained decoding does: the tiny model, having copied "177" from "177 oranges at $4",
# goes on copying `177 oranges` (the pointer follows the question), or writes the buyer's name where the
# count belongs, `/ Mia`; neither is a word of the tool's language, so neither can be written.
CODE_WORDS = (*FUNCTIONS, *STRING_METHODS, "and", "or", "not", "in", "is", "True", "False", "None")
CODE_WORD_PREFIXES = {w[:i].encode() for w in CODE_WORDS for i in range(len(w) + 1)}
WHOLE_CODE_WORDS = {w.encode() for w in CODE_WORDS}
NUMBER_LETTERS = b"_eExXoObBjJabcdefABCDEF"  # letters a number may hold: 1e5, 0x1f, 0o17, 0b101, 2j, 1_000


def is_name_byte(byte, name):
    """Whether `byte` continues (or starts, if `name` is empty) a Python name."""
    return chr(byte).isalpha() or byte == ord("_") or (bool(name) and chr(byte).isdigit())


def code_words_ok(name, after_digit, text):
    """Whether `text` may follow code that ends in the name `name` (b"" if none; `after_digit`: the code
    ends in a digit, where letters belong to the number, `1e5`, `0x1f`) and keep every name a word of the
    tool, whole where it ends and a word's start where the text ends. A quote ends the check: inside a
    string anything may be written (the copy guard watches copies)."""
    for byte in text:
        if byte == QUOTE:
            return True
        if after_digit and (chr(byte).isdigit() or byte in NUMBER_LETTERS):
            continue
        if is_name_byte(byte, name):
            name += bytes([byte])
            if name not in CODE_WORD_PREFIXES:
                return False
            continue
        if name and name not in WHOLE_CODE_WORDS:
            return False
        name, after_digit = b"", chr(byte).isdigit()
    return True


def code_state(call):
    """-> None inside a string literal of the call, else (the name the call ends in, b"" if none; whether
    it ends inside a number)."""
    if call.count(QUOTE) % 2:
        return None
    tail = re.search(rb"[A-Za-z0-9_]*$", call).group()
    return (b"", True) if tail[:1].isdigit() else (tail, False)


def copy_literal_state(call):
    """Where the bytes of a code call so far stand: None (not inside a string literal), "opened" (just
    after an opening quote: the next token says whether this is a copy) or the bytes copied so far (inside
    `' ...`, without the quote and space that open it)."""
    inside, start = False, 0
    for i, byte in enumerate(call):
        if byte == QUOTE:  # a quote opens or closes a literal
            inside, start = not inside, i + 1
    if not inside:
        return None
    literal = call[start:]
    if not literal:
        return "opened"
    return literal[1:] if literal[:1] == b" " else None


@dataclass
class Completion:
    """One sampled continuation. `sampled[i]` is 1 where the model chose tokens[i] and 0 where the engine
    forced it (tool outputs): RL must only credit or blame the model for its own choices."""
    prompt_index: int
    tokens: list = field(default_factory=list)
    sampled: list = field(default_factory=list)
    finish: str = ""  # "stop": an end token; "length": max_tokens or the context window ran out


class Row:
    """The state of one row of the batch: what it generated, and whether it is inside a tool call."""

    def __init__(self, prompt_index, source=b""):
        self.out = Completion(prompt_index)
        self.source = source  # the bytes of the prompt: what a copy literal may copy from
        self.forced = deque()  # tokens the engine will feed next instead of sampling (a tool's answer)
        self.tool = None  # the end token of the tool call being written, or None
        self.tool_tokens = []
        self.events = deque()  # tool calls and results, for stream()
        self.last_output = b""  # the bytes of the latest tool output, and of the reply's line since then
        self.line = b""  # (see quoting_part_of_a_word)

    @property
    def done(self):
        return bool(self.out.finish)


DEFAULT_MEMORY_GB = 24.0  # see Engine: fits an 80 GB GPU beside a d20 policy, its reference and optimizer


class Engine:
    """Generation for every stage that samples: chat, SFT evaluation, RL rollouts, RLHF.

    Memory. Sampling holds a KV cache of every row's keys and values, and the logits of the prefill.
    The cache is made just long enough for the call (its longest prompt + max_tokens, never more than the
    context window) and in the dtype the model computes in (bfloat16 on CUDA, where the engine runs the
    model under autocast; float32 on a CPU); and a call that would need more than `memory_gb` GB is split
    into several calls of fewer prompts each (same results when greedy; sampling draws from one seeded
    stream either way). train_gpt.sampling_bytes is the estimate both this and the plan use."""

    def __init__(self, model, tokenizer, search=None, memory_gb=DEFAULT_MEMORY_GB, copy_guard=True):
        self.model, self.tok = model, tokenizer
        self.copy_guard = copy_guard
        self.search = search  # a Search; built on the first search call if None
        self.memory_bytes = memory_gb * 2**30
        self.end_ids = {tokenizer.special_id("<|im_end|>"), tokenizer.special_id("<|endoftext|>")}
        self.call_ends = {tokenizer.special_id(a): tokenizer.special_id(b) for a, b in TOOL_CALLS.items()}
        self.tool_names = {tokenizer.special_id(end): end.strip("<|>").removesuffix("_end")  # -> "code"
                           for end in TOOL_CALLS.values()}
        self.output_ids = [tokenizer.special_id(name) for name in TOOL_OUTPUT]
        self.code_end = tokenizer.special_id("<|code_end|>")
        # Tokens the model may never sample at a given point: only the engine writes tool outputs, a turn
        # never opens inside a reply, and tool markup must nest (no call inside a call, no stray ends).
        # One row of this table per state a row can be in: 0 = outside a tool call, 1.. = inside the call
        # that `self.call_ends` lists in that place (only its own end token may close it).
        never = self.output_ids + [tokenizer.special_id(n) for n in ("<|im_start|>", "<|im_sep|>")]
        ends = list(self.call_ends.values())
        banned = [never + ends] + [never + list(self.call_ends) + list(self.end_ids) + [e for e in ends if e != own]
                                   for own in ends]
        self.ban_table = torch.zeros(len(banned), model.config.vocab_size, dtype=torch.bool)
        for state, tokens in enumerate(banned):
            self.ban_table[state, tokens] = True
        self.state_of_call = {end: state for state, end in enumerate(ends, start=1)}
        # The copy guard's tables: every ordinary token's bytes, and the reverse lookup.
        self.id_of_bytes = {b: i for i, b in enumerate(tokenizer.vocab)}
        self.longest_token = max(map(len, tokenizer.vocab))
        self.quote_tokens = [(i, b) for i, b in enumerate(tokenizer.vocab) if QUOTE in b]
        self.space_tokens = torch.zeros(model.config.vocab_size, dtype=torch.bool)
        self.space_tokens[[i for i, b in enumerate(tokenizer.vocab) if b[:1] == b" "]] = True
        self.code_word_bans = {}  # see code_word_ban

    # -- tools -------------------------------------------------------------------------------------

    def run_tool(self, end_id, query):
        """Run the tool whose call just closed; return its answer as text."""
        if end_id == self.tok.special_id("<|code_end|>"):
            return run_code(query)
        if self.search is None:
            self.search = Search()
        return format_search_results(self.search.query(query, k=1))

    def observe(self, row, token, sampled):
        """Advance a row's state machine by one token; return what the token is: "text", "call" (part of
        a tool call), "output" (forced tool answer) or "end"."""
        if not sampled:
            return "output"
        if row.tool is not None and token == row.tool:  # a call closed: pause, run it, force the answer
            query = self.tok.decode(row.tool_tokens)
            result = self.run_tool(token, query)
            answer = tool_output_tokens(self.tok, result)
            row.forced.extend([self.output_ids[0], *answer, self.output_ids[1]])
            row.last_output, row.line = self.tok.decode_bytes(answer), b""
            row.events.append({"type": "tool_call", "tool": self.tool_names[token], "query": query})
            row.events.append({"type": "tool_result", "text": self.tok.decode(answer)})
            row.tool = None
            return "call"
        if row.tool is not None:
            row.tool_tokens.append(token)
            return "call"
        if token in self.call_ends:
            row.tool, row.tool_tokens = self.call_ends[token], []
            return "call"
        if token in self.end_ids:
            row.out.finish = "stop"
            return "end"
        row.line = (row.line + self.tok.decode_bytes([token])).rsplit(b"\n", 1)[-1]
        return "text"

    def ban_invalid_tokens(self, logits, rows):
        """Constrained decoding: give -inf to the tokens that would break the protocol for each row, so
        every reply renders back into exactly the tokens the model saw. One masked fill for the whole batch:
        each row picks its state's row of the ban table."""
        states = torch.tensor([0 if row.tool is None else self.state_of_call[row.tool] for row in rows])
        mask = self.ban_table[states]
        if self.copy_guard:
            for r, row in enumerate(rows):
                if row.tool == self.code_end and not row.done and not row.forced:
                    state = copy_literal_state(self.tok.decode_bytes(row.tool_tokens))
                    if state == "opened":  # the model's likeliest token says whether it means to copy
                        favourite = logits[r].masked_fill(mask[r].to(logits.device), float("-inf")).argmax()
                        state = state if self.space_tokens[favourite.item()] else None
                    if state is not None:
                        mask[r] |= self.copy_ban(state, row.source)
                    elif (words := code_state(self.tok.decode_bytes(row.tool_tokens))) is not None:
                        mask[r] |= self.code_word_ban(*words)
                elif row.tool is None and quoting_part_of_a_word(row.line, row.last_output):
                    mask[r, list(self.end_ids)] = True
        return logits.masked_fill(mask.to(logits.device), float("-inf"))

    def code_word_ban(self, name, after_digit):
        """The tokens that would put a name outside the tool's words into a call (see CODE_WORDS), for a
        call ending in `name` (or in a number): one table per such ending, built once and kept."""
        key = (name, after_digit)
        if key not in self.code_word_bans:
            ban = torch.zeros(len(self.space_tokens), dtype=torch.bool)
            ban[[i for i, text in enumerate(self.tok.vocab) if not code_words_ok(name, after_digit, text)]] = True
            self.code_word_bans[key] = ban
        return self.code_word_bans[key]

    def copy_ban(self, state, source):
        """The tokens a copy literal may not continue with (see COPY_CLOSE). Just after the opening quote
        of a copy (state "opened"), the next token must be a space and text of `source`; inside a copy
        (state: the bytes copied so far), a token must extend them to text of `source`, or close the
        literal after a non-empty copy of whole words. What is copied is what the lecture's prompts count
        or spell: words (with the spaces between them) or a run of one mark (dots), never the punctuation
        around a word -- the user's "in adjunct?" asks about `' adjunct '`, not `' adjunct? '` (the tiny
        model's commonest slip) -- and never a quote, which would end the literal."""
        ban = torch.ones(len(self.space_tokens), dtype=torch.bool)
        allowed, bounds = set(), word_bounds(source)

        def whole(span):  # the span is whole words of the source
            return any(source.startswith(span, i) and i + len(span) in bounds for i in bounds if i < len(source))

        if state == "opened":
            allowed.add(self.id_of_bytes.get(b" "))
            for start in sorted(bounds - {len(source)}):
                for end in range(start + 1, min(start + self.longest_token, len(source) + 1)):
                    if not copyable(source[start:end]):
                        break
                    allowed.add(self.id_of_bytes.get(b" " + source[start:end]))
        else:
            starts = [i for i in bounds if i < len(source) and source.startswith(state, i)]
            for start in starts:
                rest = source[start + len(state):start + len(state) + self.longest_token]
                for end in range(len(rest) + 1):
                    if not copyable(state + rest[:end]):
                        break
                    if (state or end) and start + len(state) + end in bounds:  # the space that closes a copy
                        allowed.add(self.id_of_bytes.get(rest[:end] + b" "))
                    if end:
                        allowed.add(self.id_of_bytes.get(rest[:end]))
            for token, text in self.quote_tokens:
                grown = state + text
                end = grown.find(COPY_CLOSE)
                if end > 0 and whole(grown[:end]) and copyable(grown[:end]):
                    allowed.add(token)
        allowed.discard(None)
        if not allowed:  # a copy the guard did not start (a sampled space after a quote it judged ordinary):
            return torch.zeros_like(ban)  # nothing of it is in the message, so there is nothing to keep to
        ban[list(allowed)] = False
        return ban

    # -- memory ------------------------------------------------------------------------------------

    def compute_dtype(self):
        """The dtype the model's activations (and so its keys and values) come out in: the caller's autocast
        dtype if it set one, bfloat16 on CUDA (the engine then turns autocast on itself), else the weights'."""
        weights = next(self.model.parameters())
        if torch.is_autocast_enabled(weights.device.type):
            return torch.get_autocast_dtype(weights.device.type)
        return torch.bfloat16 if weights.device.type == "cuda" else weights.dtype

    def split_for_memory(self, prompts, n, max_tokens):
        """Consecutive groups of prompt indices, each as many as fit self.memory_bytes by
        train_gpt.sampling_bytes (at least one prompt per group, whatever it needs)."""
        item_bytes = torch.empty((), dtype=self.compute_dtype()).element_size()
        groups, current, width = [], [], 0
        for i, prompt in enumerate(prompts):
            wider = max(width, len(prompt))
            need = sampling_bytes(self.model.config, len(current) + 1, n, wider, max_tokens, item_bytes)
            if current and need > self.memory_bytes:
                groups.append(current)
                current, wider = [], len(prompt)
            current.append(i)
            width = wider
        return groups + [current] if current else groups

    # -- the decoding loop -------------------------------------------------------------------------

    @torch.inference_mode()  # like no_grad, and cheaper per operation (no autograd bookkeeping at all)
    def steps(self, prompts, n=1, max_tokens=256, temperature=1.0, top_k=None, top_p=None, seed=None,
              generator=None):
        """Decode n samples of every prompt at once; row r belongs to prompt r // n. The prompts are
        prefilled once each (left-padded to a common length) into a cache just long enough for them, copied
        n times into one long enough for the replies too (no copy when n = 1), and then all rows advance
        together, one token per step. Yields after every step (rows, events), events being (row index,
        token, kind) for the rows that produced a token (kind: see `observe`)."""
        prompts = [list(p) for p in prompts]
        capacity = self.model.config.seq_len
        for i, prompt in enumerate(prompts):
            if not prompt or len(prompt) >= capacity:
                raise ValueError(f"prompt {i} has {len(prompt)} tokens; it must have 1 to {capacity - 1} "
                                 f"to leave room in the context window of {capacity}")
        weights = next(self.model.parameters())
        if generator is None:
            generator = torch.Generator(device=weights.device)
            generator.manual_seed(seed if seed is not None else torch.seed())
        dtype = self.compute_dtype()
        autocast = (torch.autocast(weights.device.type, dtype=dtype) if dtype != weights.dtype
                    else contextlib.nullcontext())
        width = max(map(len, prompts))
        length = min(width + max_tokens, capacity)  # the most positions any row can reach
        pads = [width - len(p) for p in prompts]
        batch = torch.tensor([[0] * pad + p for pad, p in zip(pads, prompts)], device=weights.device)
        cache = KVCache(self.model.config, len(prompts), weights.device, dtype, pad=pads if any(pads) else None,
                        length=length if n == 1 else width)
        with autocast:
            logits = self.model(batch, kv_cache=cache)[0][:, -1].float()
        cache.repeat_rows(n, length)
        logits = logits.repeat_interleave(n, dim=0) if n > 1 else logits
        sources = [copy_source(self.tok.decode_bytes(p)) for p in prompts]
        rows = [Row(i // n, sources[i // n]) for i in range(len(prompts) * n)]
        idle_token = min(self.end_ids)  # what finished rows are fed, to keep the batch rectangular
        while True:
            logits = self.ban_invalid_tokens(logits, rows)
            choices = sample_next(logits, temperature, top_k, top_p, generator)[:, 0].tolist()
            feed, events = [], []
            for r, (row, choice) in enumerate(zip(rows, choices)):
                if row.done:
                    feed.append(idle_token)
                    continue
                sampled = not row.forced
                token = choice if sampled else row.forced.popleft()
                row.out.tokens.append(token)
                row.out.sampled.append(int(sampled))
                events.append((r, token, self.observe(row, token, sampled)))
                if not row.done and len(row.out.tokens) >= max_tokens:
                    row.out.finish = "length"
                feed.append(token)
            if cache.pos >= cache.length:  # the cache (at most the context window) is full, whoever is done
                for row in rows:
                    row.out.finish = row.out.finish or "length"
            yield rows, events
            if all(row.done for row in rows):
                return
            with autocast:
                logits = self.model(torch.tensor(feed, device=weights.device)[:, None], kv_cache=cache)[0][:, -1]
            logits = logits.float()

    def generate(self, prompts, n=1, max_tokens=256, temperature=1.0, top_k=None, top_p=None, seed=None):
        """-> a list of Completion, prompt-major (the n samples of prompt 0 first). `prompts`: a list of
        token-id lists, or one such list. Calls that would exceed the memory budget run in several parts."""
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        weights = next(self.model.parameters())
        generator = torch.Generator(device=weights.device)
        generator.manual_seed(seed if seed is not None else torch.seed())
        out = []
        for group in self.split_for_memory(prompts, n, max_tokens):
            rows = []
            for rows, _ in self.steps([prompts[i] for i in group], n, max_tokens, temperature, top_k, top_p,
                                      generator=generator):
                pass
            for row in rows:
                row.out.prompt_index = group[row.out.prompt_index]
                out.append(row.out)
        return out

    def stream(self, prompt, max_tokens=256, temperature=1.0, top_k=None, top_p=None, seed=None):
        """One sample, as events the moment they are known: {"type": "text", "text"} as soon as the bytes
        form valid UTF-8; {"type": "tool_call", "tool", "query"} and {"type": "tool_result", "text"} when
        a tool runs; finally {"type": "end", "finish", "completion"}."""
        pending = b""  # bytes of a character split across tokens, waiting for the rest
        for rows, events in self.steps([prompt], 1, max_tokens, temperature, top_k, top_p, seed):
            row = rows[0]
            for _, token, kind in events:
                if kind == "text":
                    pending += self.tok.decode_bytes([token])
                    text, pending = split_valid_utf8(pending)
                    if text:
                        yield {"type": "text", "text": text}
                while row.events:
                    yield row.events.popleft()
            if row.done:
                if pending:
                    yield {"type": "text", "text": pending.decode("utf-8", errors="replace")}
                yield {"type": "end", "finish": row.out.finish, "completion": row.out}
                return


def split_valid_utf8(data):
    """-> (decoded text, leftover bytes): decode as much as forms whole characters. Up to 3 trailing bytes
    of an unfinished character wait for the next token; anything else invalid becomes U+FFFD."""
    for cut in range(len(data), max(-1, len(data) - 4), -1):
        try:
            return data[:cut].decode("utf-8"), data[cut:]
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="replace"), b""


# ====================================================================================================
# Checkpoints and conversations
# ====================================================================================================

CHAT_STAGES = ("rlhf", "rl", "sft")  # newest stage first: the best-trained assistant wins
SYSTEM_MESSAGE = ("You are scratchgpt, a small assistant trained from scratch by the scratchgpt project. "
                  "You answer briefly, use tools for arithmetic and counting, and say so when you do not know.")


def find_checkpoint(explicit, base, out_dir="out"):
    """The checkpoint to load: --checkpoint if given; else out/base for --base; else the latest of
    rlhf -> rl -> sft that exists."""
    if explicit:
        return explicit
    stages = ("base",) if base else CHAT_STAGES
    for stage in stages:
        path = os.path.join(out_dir, stage, "model.pt")
        if os.path.exists(path):
            return path
    first = "python train_gpt.py" if base else "python sft.py (after python train_gpt.py), or bash run.sh"
    raise UserError(f"no {'base' if base else 'chat'} checkpoint under {out_dir}/ yet: run {first} first")


def assistant_content(tok, completion):
    """A reply as the conversation stores it: text with the tool markup kept, so that rendering the
    history again reproduces exactly the tokens the model saw (the closing <|im_end|> is dropped). A reply
    cut off by max_tokens inside a tool call or its output loses that unfinished piece."""
    tokens = completion.tokens[:-1] if completion.finish == "stop" else list(completion.tokens)
    openers = {tok.special_id(name) for name in (*TOOL_CALLS, TOOL_OUTPUT[0])}
    closers = {tok.special_id(name) for name in (*TOOL_CALLS.values(), TOOL_OUTPUT[1])}
    last_open = max((i for i, t in enumerate(tokens) if t in openers), default=-1)
    if last_open >= 0 and not any(t in closers for t in tokens[last_open:]):
        tokens = tokens[:last_open]
    return tok.decode(tokens)


MIN_REPLY_TOKENS = 16


def fit_history(tok, messages, room, capacity):
    """Drop the oldest user/assistant exchanges (never the system message) until the prompt plus `room`
    tokens for the reply fit the context window. Returns (messages, prompt ids, how many were dropped);
    raises ValueError when even the newest message alone leaves no room for a reply."""
    messages, dropped = list(messages), 0
    keep = 1 if messages and messages[0]["role"] == "system" else 0
    prompt = render_for_completion(tok, messages)
    while len(prompt) + room > capacity and len(messages) - keep > 1:
        del messages[keep:keep + 2]
        dropped += 2
        prompt = render_for_completion(tok, messages)
    if len(prompt) + MIN_REPLY_TOKENS > capacity:
        raise ValueError(f"the conversation needs {len(prompt)} tokens but the context window holds {capacity}, "
                         f"with room for at least {MIN_REPLY_TOKENS} more for the reply: ask something shorter")
    return messages, prompt, dropped


# ====================================================================================================
# Command line: chat, one-shot answers, base-model completion
# ====================================================================================================

@dataclass
class ChatConfig:
    checkpoint: str = opt("", "checkpoint file or stage folder (default: latest of out/rlhf, out/rl, out/sft)")
    prompt: str = opt("", "answer this one question and exit (-p)")
    base: str = opt("", "base-model mode: continue this text like a document")
    n: int = opt(1, "with --base: how many samples of the same prompt (-n)", low=1)
    probs: bool = opt(False, "with --base: print the top next-token probabilities at every step")
    stop: tuple = opt((), "with --base: end each sample at the first of these strings (e.g. '\\nHuman:')")
    system: str = opt(SYSTEM_MESSAGE, "the system message at the top of every conversation ('' for none)")
    temperature: float = opt(0.7, "sampling temperature (0 = greedy)", low=0)
    top_k: int = opt(50, "sample only among the k likeliest tokens (0 = all)", low=0)
    top_p: float = opt(1.0, "sample only among the likeliest tokens that cover this probability mass",
                        above=0, high=1)
    max_tokens: int = opt(200, "the most tokens one reply may have", low=1)
    seed: int = opt(-1, "random seed (-1 = a fresh one every time)", low=-1)
    search_folder: str = opt("", "folder of .txt/.md files for the search tool (default: the embedded corpus)",
                              path="dir")
    device: str = opt("auto", "cuda, mps, cpu, or auto (the first of them that this machine has)")
    memory_gb: float = opt(DEFAULT_MEMORY_GB, "most GB one sampling call's KV cache and logits may take", above=0)
    web: bool = opt(False, "serve the web chat and the OpenAI-compatible API instead of the terminal chat")
    host: str = opt("127.0.0.1", "with --web: address to listen on")
    port: int = opt(8000, "with --web: port (0 = any free port)", low=0, high=65535)


def sampling_args(cfg, seed=None):
    return dict(temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p if cfg.top_p < 1 else None,
                seed=seed if seed is not None else (cfg.seed if cfg.seed >= 0 else None))


class Terminal:
    """Printing for the terminal chat: streamed text, tool calls made visible, dim when colour works."""

    def __init__(self):
        self.colour = use_colour()

    def dim(self, text):
        return f"\x1b[2m{text}\x1b[0m" if self.colour else text

    def show(self, event):
        if event["type"] == "text":
            print(event["text"], end="", flush=True)
        elif event["type"] == "tool_call":
            verb = "Analyzed" if event["tool"] == "code" else "Searching"
            print(self.dim(f"\n[{verb}: {event['query']}]"), end="", flush=True)
        elif event["type"] == "tool_result":
            print(self.dim(f" [Result: {event['text']}]\n"), end="", flush=True)


def reply(engine, prompt, cfg, out, seed=None):
    """Sample one assistant turn after `prompt`, streaming it to the terminal; returns the Completion."""
    completion = None
    for event in engine.stream(prompt, cfg.max_tokens, **sampling_args(cfg, seed)):
        out.show(event)
        if event["type"] == "end":
            completion = event["completion"]
    print()
    if completion.finish == "length":
        print(out.dim(f"[stopped: reached {cfg.max_tokens} tokens or the end of the context window]"))
    return completion


HELP = ("commands: /clear (new conversation)  /system TEXT  /temp X  /tokens (show the rendered protocol)  "
        "/resample (a new answer to the last question)  /quit")


def chat_loop(engine, cfg):
    """The terminal chat: the conversation so far lives in the context window, nowhere else."""
    out = Terminal()
    system = cfg.system
    messages = [{"role": "system", "content": system}] if system else []
    print(HELP)
    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command == "/quit":
                return
            if command == "/clear":
                messages = [{"role": "system", "content": system}] if system else []
            elif command == "/system":
                system = arg.strip()
                messages = ([{"role": "system", "content": system}] if system else []) + \
                    [m for m in messages if m["role"] != "system"]
            elif command == "/temp":
                try:
                    cfg.temperature = float(arg)
                except ValueError:
                    print("usage: /temp 0.7")
            elif command == "/tokens":
                if messages:
                    ids, _ = render_conversation(engine.tok, messages)
                    print(render_tokens(engine.tok, ids, colour=out.colour))
                    print(ids)
                    print(f"Token count {len(ids)}")
            elif command == "/resample" and messages and messages[-1]["role"] == "assistant":
                messages.pop()
                print("assistant> ", end="")
                prompt = render_for_completion(engine.tok, messages)
                completion = reply(engine, prompt, cfg, out, seed=int(time.time() * 1000) % 2**31)
                messages.append({"role": "assistant", "content": assistant_content(engine.tok, completion)})
            else:
                print(HELP)
            continue
        try:
            candidate = messages + [{"role": "user", "content": line}]
            candidate, prompt, dropped = fit_history(engine.tok, candidate, cfg.max_tokens,
                                                     engine.model.config.seq_len)
        except ValueError as e:
            print(f"(cannot send that: {e})")
            continue
        if dropped:
            print(out.dim(f"[the oldest {dropped} messages no longer fit the context window and were dropped]"))
        messages = candidate
        print("assistant> ", end="")
        completion = reply(engine, prompt, cfg, out)
        messages.append({"role": "assistant", "content": assistant_content(engine.tok, completion)})


@torch.no_grad()
def trace_probabilities(model, tok, prompt, steps, cfg, top=5):
    """The lecture's autoregressive trace: at every step, the model's top next-token probabilities and
    the token the biased coin picked, appended before the next step."""
    weights = next(model.parameters())
    generator = torch.Generator(device=weights.device)
    generator.manual_seed(cfg.seed if cfg.seed >= 0 else torch.seed())
    cache = KVCache(model.config, 1, weights.device, weights.dtype)
    logits = model(torch.tensor([prompt], device=weights.device), kv_cache=cache)[0][:, -1]
    for step in range(min(steps, model.config.seq_len - len(prompt))):
        probs = logits.softmax(dim=-1)[0]
        best = probs.topk(top)
        choice = sample_next(logits, cfg.temperature, cfg.top_k or None, None, generator)
        table = "  ".join(f"{tok.token_text(i)!r} {p:.0%}" for p, i in zip(best.values.tolist(), best.indices.tolist()))
        print(f"step {step:3d}: {table}  -> picked {tok.token_text(choice.item())!r} (id {choice.item()})")
        if choice.item() in (tok.special_id("<|endoftext|>"),):
            return
        logits = model(choice, kv_cache=cache)[0][:, -1]


def base_mode(model, tok, cfg):
    """The base model is a document simulator: it continues text, differently on every sample."""
    prompt = tok.encode_ordinary(cfg.base)
    capacity = model.config.seq_len
    if len(prompt) >= capacity:
        print(f"[the prompt has {len(prompt)} tokens; keeping its last {capacity // 2} to fit the context window]")
        prompt = prompt[-(capacity // 2):]
    if cfg.probs:
        trace_probabilities(model, tok, prompt, cfg.max_tokens, cfg)
        return
    engine = Engine(model, tok, memory_gb=cfg.memory_gb)
    stops = [s.encode().decode("unicode_escape") for s in cfg.stop]  # '\nHuman:' typed in a shell
    for k, completion in enumerate(engine.generate(prompt, cfg.n, cfg.max_tokens, **sampling_args(cfg))):
        print(f"--- sample {k + 1} of {cfg.n} ---")
        text, stopped = cut_at_stop(tok.decode(completion.tokens).replace("<|endoftext|>", ""), stops)
        print(cfg.base + text + (f"\n[stopped at {stopped!r}]" if stopped else ""))


def cut_at_stop(text, stops):
    """-> (text up to the earliest stop string, that stop string or None). A base model has no end of turn:
    asked to play an assistant on a page of Human/Assistant turns, it writes the human's next turn too."""
    found = [(text.find(s), s) for s in stops if s and s in text]
    if not found:
        return text, None
    cut, stop = min(found)
    return text[:cut], stop


# ====================================================================================================
# The web: a one-page chat and an OpenAI-compatible API, on the standard library's threaded HTTP server
# ====================================================================================================

MAX_BODY_BYTES = 1 << 20
MAX_MESSAGES = 200
MAX_STOP_STRINGS = 4
# Bounds that keep one careless or hostile client from starving the others (each is a make_server argument):
READ_SECONDS = 10       # the whole request must arrive within this; a body still trickling in gets 408
MAX_CONNECTIONS = 32    # open connections, each a thread; one more is answered 503 and closed at once
MAX_QUEUED = 16         # generations waiting for the model (one runs at a time); one more is answered 503
RETRY_AFTER_SECONDS = 1
GONE_CHECK_SECONDS = 0.05  # how often a request waiting for the model looks whether its client is still there
# A request that finds the queue full waits this long for a place before its 503: a client that hung up
# frees its place within GONE_CHECK_SECONDS (or one token, if its reply was being generated).
QUEUE_GRACE_SECONDS = 0.1


class RequestError(Exception):
    """A request the API refuses: the HTTP status, the message of its JSON error body, extra headers."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


class ClientGone(ConnectionError):
    """The client closed its connection before its reply was complete: nobody is left to answer."""


class BadRequest(RequestError):
    """A request body the API refuses with 400 and a JSON error naming the problem."""

    def __init__(self, message):
        super().__init__(400, message)


def field_of(body, name, kind, default, low=None, high=None):
    """One validated field of a request body. Numbers must be finite: JSON as Python reads it allows
    NaN and 1e999 (infinity), and every comparison with NaN is false, so a range check alone lets it by."""
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BadRequest(f"'{name}' must be a {kind.__name__}")
    if kind is float and not math.isfinite(value):
        raise BadRequest(f"'{name}' must be a finite number, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise BadRequest(f"'{name}' must be between {low} and {high}")
    return value


def refuse_constant(name):
    """json.loads hook for NaN, Infinity and -Infinity, which are not JSON at all."""
    raise BadRequest(f"the body is not valid JSON: {name} is not a JSON number")


def parse_json_body(raw):
    try:
        return json.loads(raw, parse_constant=refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest("the body is not valid JSON: nested too deeply") from None
    except ValueError as e:  # an integer of more than 4,300 digits (Python's limit on int parsing)
        raise BadRequest(f"the body is not valid JSON: {e}") from None


class Turns:
    """One generation at a time, in order of arrival, and a request whose client hangs up while it waits
    leaves the line. (A Lock cannot do both: to look at its client a waiter must take it with a timeout,
    and each timeout sends the waiter to the back. Measured with bench.py serve, 16 clients x 10 streaming
    requests on 2 loaded cores: p50 0.53 s / p95 3.25 s with such a lock, 1.22 s / 1.54 s with Turns.)"""

    def __init__(self):
        self.cond, self.line, self.busy = threading.Condition(), deque(), False

    @contextlib.contextmanager
    def turn(self, client_gone):
        me = object()
        with self.cond:
            self.line.append(me)
            try:
                while self.busy or self.line[0] is not me:
                    self.cond.wait(timeout=GONE_CHECK_SECONDS)
                    if client_gone():
                        raise ClientGone("the client hung up while its request waited for the model")
            except BaseException:
                self.line.remove(me)
                self.cond.notify_all()  # the one behind may be first now
                raise
            self.line.popleft()
            self.busy = True
        try:
            yield
        finally:
            with self.cond:
                self.busy = False
                self.cond.notify_all()


class ChatService:
    """The model behind the API: validates requests, renders them, and streams completions. One
    generation at a time: concurrent clients are served in turn (Turns), at most MAX_QUEUED of them
    waiting; beyond that a client is told to come back later instead of joining an endless queue."""

    def __init__(self, engine, name, defaults, max_queued=MAX_QUEUED):
        self.engine, self.name, self.defaults = engine, name, defaults
        self.turns = Turns()
        self.places = threading.BoundedSemaphore(max_queued + 1)  # the running generation and the waiting

    @contextlib.contextmanager
    def place_in_queue(self):
        if not self.places.acquire(timeout=QUEUE_GRACE_SECONDS):
            raise RequestError(503, "too many requests are waiting for the model; try again shortly",
                               {"Retry-After": str(RETRY_AFTER_SECONDS)})
        try:
            yield
        finally:
            self.places.release()

    def parse(self, body):
        """A /v1/chat/completions body -> (prompt ids, sampling kwargs, max_tokens, stop strings, stream)."""
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not 0 < len(messages) <= MAX_MESSAGES:
            raise BadRequest(f"'messages' must be a list of 1 to {MAX_MESSAGES} messages")
        messages = [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m
                    for m in messages]
        try:
            prompt = render_for_completion(self.engine.tok, messages)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        capacity = self.engine.model.config.seq_len
        if len(prompt) >= capacity:
            raise BadRequest(f"the messages take {len(prompt)} tokens; the context window holds {capacity}")
        max_tokens = field_of(body, "max_tokens", int, self.defaults.max_tokens, 1, capacity)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(x, str) and x for x in stop):
            raise BadRequest(f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings")
        top_p = field_of(body, "top_p", float, 1.0)
        if not 0 < top_p <= 1:  # top_p = 0 would keep no token at all
            raise BadRequest(f"'top_p' must be in (0, 1], got {top_p}")
        sampling = dict(temperature=field_of(body, "temperature", float, self.defaults.temperature, 0.0, 2.0),
                        top_p=top_p if top_p < 1 else None,
                        seed=field_of(body, "seed", int, None, 0, 2**63 - 1),
                        top_k=self.defaults.top_k or None)
        return prompt, sampling, max_tokens, stop, field_of(body, "stream", bool, False)

    def pieces(self, prompt, sampling, max_tokens, stop, client_gone=lambda: False):
        """Yield (text, finish, completion tokens) pieces of the reply, finish and count only on the last.
        The text keeps the tool markup, so a client that sends the reply back in the history gets exactly
        the same tokens rendered. Text that might be the start of a stop string is held back until it
        is clear whether the stop string completes.
        A client that hangs up while its request waits for the model, or while it generates, ends it
        (ClientGone): otherwise a request nobody waits for any more keeps its place in the queue until its
        turn comes, while the client, reconnected at once, is refused with 503. Measured with 16 clients x 10
        streaming requests, every second one hung up after its first bytes (bench.py serve, its "every 2nd
        hangs up" row): 117 of 160 requests refused without this check, 17 with it, none with
        QUEUE_GRACE_SECONDS too."""
        text, sent = "", 0
        with self.turns.turn(client_gone):
            for event in self.engine.stream(prompt, max_tokens, **sampling):
                if client_gone():
                    raise ClientGone("the client hung up during its reply")
                if event["type"] == "end":
                    yield text[sent:], event["finish"], len(event["completion"].tokens)
                    return
                text += event_text(event)
                hit = min((text.find(s) for s in stop if s in text), default=-1)
                if hit >= 0:
                    yield text[sent:hit], "stop", len(self.engine.tok.encode(text[:hit], allowed_special="all"))
                    return
                safe = len(text) - max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
                if safe > sent:
                    yield text[sent:safe], None, None
                    sent = safe


def event_text(event):
    """A stream event as reply text: words as they are, tool calls and results in the protocol's markup."""
    if event["type"] == "text":
        return event["text"]
    if event["type"] == "tool_call":
        return f"<|{event['tool']}_start|>{event['query']}<|{event['tool']}_end|>"
    return f"{TOOL_OUTPUT[0]}{event['text']}{TOOL_OUTPUT[1]}"


LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def host_name(authority):
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1' (the Host header's form, also an Origin's netloc)."""
    return urllib.parse.urlsplit("//" + authority).hostname or ""


class Handler(http.server.BaseHTTPRequestHandler):
    """Every request gets an answer: a page, JSON, a stream, or a JSON error with the right status --
    never a connection closed without a word, whatever the client sent."""
    service = None  # set by make_server, as is read_seconds
    read_seconds = READ_SECONDS
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # so even an answer to garbage starts with a status line
    # path -> {method: handler}; HEAD answers like GET without the body
    ROUTES = {"/": {"GET": "page"}, "/health": {"GET": "health"}, "/v1/models": {"GET": "models"},
              "/v1/chat/completions": {"POST": "chat_completions"}}

    def setup(self):
        self.timeout = self.read_seconds  # every read (and write) on the socket waits at most this long
        super().setup()

    def log_message(self, format, *args):  # one short line per request instead of the default
        print(f"{self.address_string()} {format % args}")

    def do_GET(self):
        self.route()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def route(self):
        path = self.path.split("?", 1)[0]
        try:
            methods = self.ROUTES.get(path)
            if methods is None:
                raise RequestError(404, f"no such path {path}")
            method = "GET" if self.command == "HEAD" else self.command
            if method not in methods:
                allowed = ", ".join(sorted({*methods, *(["HEAD"] if "GET" in methods else [])}))
                raise RequestError(405, f"{path} takes {allowed}, not {self.command}", {"Allow": allowed})
            getattr(self, methods[method])()
        except RequestError as e:
            self.send_error_json(e.status, str(e), e.headers)
        except (ConnectionError, TimeoutError):  # BrokenPipeError, ConnectionResetError, ClientGone
            self.close_connection = True  # the client is gone or stuck: nobody to answer
        except Exception as e:  # a bug: still an answer, and the server goes on serving
            self.log_message("error %s: %s", type(e).__name__, e)
            self.send_error_json(500, f"internal error ({type(e).__name__})", server_error=True)

    # -- answers -----------------------------------------------------------------------------------

    def send_body(self, status, content_type, data, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_json(self, status, obj, headers=None):
        self.send_body(status, "application/json", json.dumps(obj).encode(), headers)

    def send_error_json(self, status, message, headers=None, server_error=False):
        if self.command != "GET" and self.command != "HEAD":
            self.close_connection = True  # a body we did not read must not be taken for the next request
        kind = "server_error" if server_error or status >= 500 else "invalid_request_error"
        self.send_json(status, {"error": {"message": message, "type": kind}}, headers)

    def send_error(self, code, message=None, explain=None):
        """What http.server answers to a malformed request line or headers: JSON too, like every error."""
        self.close_connection = True
        self.send_json(code, {"error": {"message": message or self.responses.get(code, ("error",))[0],
                                        "type": "invalid_request_error"}})

    def health(self):
        self.send_json(200, {"status": "ok"})

    def models(self):
        self.send_json(200, {"object": "list", "data": [
            {"id": self.service.name, "object": "model", "created": 0, "owned_by": "scratchgpt"}]})

    def page(self):
        page = WEB_PAGE.replace("{SYSTEM}", json.dumps(self.service.defaults.system)).encode()
        self.send_body(200, "text/html; charset=utf-8", page)

    # -- the API -----------------------------------------------------------------------------------

    def check_browser_origin(self):
        """Refuse what a web page on another site could make the user's browser send. A page may POST a
        text/plain "simple request" anywhere without asking first (no CORS preflight), so: the body must
        be declared application/json (which a cross-site page can only send after a preflight we never
        grant), an Origin header must name this very server, and when we listen on loopback only, the
        Host must be a loopback name (a DNS-rebinding page calls us by its own domain name)."""
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise RequestError(415, f"the body must be sent as Content-Type: application/json, not {content_type!r}")
        host = self.headers.get("Host", "")
        if host_name(self.server.server_address[0]) in LOOPBACK_NAMES and host_name(host) not in LOOPBACK_NAMES:
            raise RequestError(403, f"Host {host!r} is not this server's loopback address")
        origin = self.headers.get("Origin")
        if origin is not None and urllib.parse.urlsplit(origin).netloc != host:
            raise RequestError(403, f"cross-origin requests are refused (Origin {origin}, Host {host})")

    def read_body(self):
        """The request body, within MAX_BODY_BYTES and read_seconds in all (not per read: a client that
        sends one byte a second would otherwise hold this thread for as long as it likes)."""
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "a Content-Length header is required")
        if not length.strip().isdigit():
            raise BadRequest(f"Content-Length must be a number of bytes, got {length!r}")
        length = int(length)
        if length > MAX_BODY_BYTES:
            raise RequestError(413, f"the body has {length} bytes; at most {MAX_BODY_BYTES} are accepted")
        deadline, chunks, got = time.monotonic() + self.read_seconds, [], 0
        try:
            while got < length:
                self.connection.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = self.rfile.read1(length - got)
                if not chunk:
                    raise BadRequest(f"the body ended after {got} of {length} bytes")
                chunks.append(chunk)
                got += len(chunk)
        except TimeoutError:
            raise RequestError(408, f"the body did not arrive within {self.read_seconds:g} s "
                                    f"({got} of {length} bytes)") from None
        finally:
            self.connection.settimeout(self.read_seconds)
        return b"".join(chunks)

    def chat_completions(self):
        self.check_browser_origin()
        body = parse_json_body(self.read_body())
        prompt, sampling, max_tokens, stop, stream = self.service.parse(body)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.service.name}
        with self.service.place_in_queue():
            pieces = self.service.pieces(prompt, sampling, max_tokens, stop, self.client_gone)
            try:
                if stream:
                    return self.stream_reply(meta, pieces)
                content, finish, used = "", None, 0
                for text, finish, used in pieces:
                    content += text
            finally:
                pieces.close()  # releases the model's lock now, even if the client went away mid-reply
        self.send_json(200, {**meta, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": used,
                      "total_tokens": len(prompt) + used}})

    def stream_reply(self, meta, pieces):
        """Server-sent events, one chunk per piece of text, as OpenAI's API streams. The stream always ends
        with `data: [DONE]`, after an error event if generating failed half-way (the 200 is already sent)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def send(obj):
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

        def chunk(delta, finish=None):
            send({**meta, "object": "chat.completion.chunk",
                  "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        try:
            chunk({"role": "assistant", "content": ""})
            try:
                for text, finish, _ in pieces:
                    if text:
                        chunk({"content": text})
                    if finish:
                        chunk({}, finish)
            except (ConnectionError, TimeoutError):
                raise
            except Exception as e:  # a bug half-way: the client still learns the reply is over, and why
                self.log_message("error %s: %s", type(e).__name__, e)
                send({"error": {"message": f"internal error ({type(e).__name__})", "type": "server_error"}})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (ConnectionError, TimeoutError):
            pass  # the client went away (or stopped reading); the caller closes the generator

    def client_gone(self):
        """Has the client closed its end of the connection? Its request has been read whole, so the socket
        turns readable now only when the client hangs up (an empty peek) or sends another request (bytes:
        still there). A client that shuts down its sending half after the request counts as gone too, as
        nginx counts it."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # reset by the peer, or already closed
            return True


class BoundedHTTPServer(http.server.ThreadingHTTPServer):
    """The standard threaded server, with a bound on threads: one per open connection up to
    max_connections; a connection beyond that is answered 503 at once by the accepting thread."""
    daemon_threads = True
    request_queue_size = 128  # the listen backlog (default 5): a burst of clients must not be reset

    def __init__(self, address, handler, max_connections=MAX_CONNECTIONS):
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            return self.refuse(request)
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def refuse(self, request):
        body = json.dumps({"error": {"message": "too many open connections; try again shortly",
                                     "type": "server_error"}}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: {RETRY_AFTER_SECONDS}\r\nConnection: close\r\n\r\n")
        try:
            request.settimeout(1.0)  # a few hundred bytes fit any socket buffer; never stall the accept loop
            request.sendall(head.encode() + body)
        except OSError:
            pass
        self.shutdown_request(request)


def make_server(engine, cfg, name="scratchgpt", read_seconds=READ_SECONDS, max_connections=MAX_CONNECTIONS,
                max_queued=MAX_QUEUED):
    """A threaded HTTP server (not yet serving) bound to cfg.host:cfg.port (port 0 = any free port)."""
    service = ChatService(engine, name, cfg, max_queued)
    handler = type("BoundHandler", (Handler,), {"service": service, "read_seconds": read_seconds})
    try:
        return BoundedHTTPServer((cfg.host, cfg.port), handler, max_connections)
    except OSError as e:  # the port is taken, or not ours to use
        raise UserError(f"--host {cfg.host} --port {cfg.port}: cannot listen there ({e.strerror})") from None


def serve(cfg):
    path = find_checkpoint(cfg.checkpoint, False)
    model, tok, _ = load_checkpoint(path, device=setup_runtime(cfg.device).device)
    model.eval()
    engine = Engine(model, tok, Search(cfg.search_folder) if cfg.search_folder else None, cfg.memory_gb)
    server = make_server(engine, cfg, name=os.path.basename(os.path.dirname(os.path.abspath(path))) or "scratchgpt")
    print(f"serving {path} on http://{cfg.host}:{server.server_port}/ (chat page) and /v1/chat/completions")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


WEB_PAGE = r"""<!doctype html>
<html><head><meta charset="utf-8"><title>scratchgpt</title>
<style>
 body { font: 15px/1.5 system-ui, sans-serif; max-width: 760px; margin: 2em auto; padding: 0 1em; color: #222; }
 #log div { white-space: pre-wrap; margin: .6em 0; padding: .5em .8em; border-radius: 8px; }
 .user { background: #eef3ff; } .assistant { background: #f4f4f4; }
 .tool { color: #777; font-family: ui-monospace, monospace; font-size: 13px; }
 textarea, input { width: 100%; box-sizing: border-box; font: inherit; }
 button { margin: .4em .4em 0 0; }
</style></head>
<body>
<h2>scratchgpt</h2>
<label>System message <input id="system"></label>
<div id="log"></div>
<textarea id="input" rows="3" placeholder="Ask something; Enter sends, Shift+Enter is a new line"></textarea>
<button id="send">Send</button><button id="regen">Regenerate</button><button id="clear">Clear</button>
<script>
const systemBox = document.getElementById("system"), log = document.getElementById("log");
const input = document.getElementById("input");
systemBox.value = {SYSTEM};
let messages = [];

// Tool markup in a reply becomes a readable note: what was run, and what it answered.
function pretty(text) {
  return text
    .replace(/<\|code_start\|>([\s\S]*?)(<\|code_end\|>|$)/g, "\n[Analyzed: $1]")
    .replace(/<\|search_start\|>([\s\S]*?)(<\|search_end\|>|$)/g, "\n[Searching: $1]")
    .replace(/<\|output_start\|>([\s\S]*?)(<\|output_end\|>|$)/g, " [Result: $1]\n");
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = role;
  div.textContent = role === "assistant" ? pretty(text) : text;
  log.appendChild(div);
  return div;
}

async function complete() {
  const history = (systemBox.value ? [{role: "system", content: systemBox.value}] : []).concat(messages);
  const div = bubble("assistant", "");
  let reply = "";
  const response = await fetch("/v1/chat/completions", {method: "POST",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify({messages: history, stream: true})});
  if (!response.ok) { div.textContent = "error: " + (await response.json()).error.message; return; }
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {done, value} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") continue;
      reply += JSON.parse(data).choices[0].delta.content || "";
      div.textContent = pretty(reply);
    }
  }
  div.dataset.done = "1";
  messages.push({role: "assistant", content: reply});
}

function send() {
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  messages.push({role: "user", content: text});
  bubble("user", text);
  complete();
}

document.getElementById("send").onclick = send;
input.onkeydown = e => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } };
document.getElementById("regen").onclick = () => {
  if (messages.length && messages[messages.length - 1].role === "assistant") {
    messages.pop(); log.removeChild(log.lastChild); complete();
  }
};
document.getElementById("clear").onclick = () => { messages = []; log.textContent = ""; };
// ?q=... fills the box and sends it: a link that opens the page with a question already asked
const q = new URLSearchParams(location.search).get("q");
if (q) { input.value = q; send(); }
</script>
</body></html>
"""


# ====================================================================================================
# The lecture tour: `python chat.py demo NAME` runs one demonstration of the lecture, `demo --list` lists
# them in the lecture's order. Each prints its SPEC.md id in its header and what the lecture shows, from
# the tiny pipeline's checkpoints (out/base, out/sft, out/rl, out/rlhf), in well under a minute on 2 CPU
# cores. Demonstrations that another stage already prints (the tokenizer's views, the nudge) are run
# from that stage's own command; the ones here are about talking to the models.
# ====================================================================================================

@dataclass
class DemoConfig:
    out_dir: str = opt("out", "the folder holding base/, sft/, rl/, rlhf/ (the tiny pipeline's layout)")
    n: int = opt(20, "prompts (or samples) a rate is measured over")
    seed: int = opt(0, "random seed of the samples")
    list: bool = opt(False, "list the demonstrations in the lecture's order and exit")


@dataclass
class LectureDemo:
    spec: str    # the SPEC.md id(s) it demonstrates
    name: str    # what `chat.py demo NAME` calls it
    shows: str   # what you see (one line, for --list and the README table)
    run: object  # run(cfg, name): prints the demonstration


STAGE_COMMANDS = {"base": "python train_gpt.py", "sft": "python sft.py", "rl": "python rl.py",
                  "rlhf": "python rlhf.py", "sft-norefusal": "python sft.py --no-refusals --out-dir out/sft-norefusal"}


def demo_checkpoint(cfg, stage):
    """(model, tokenizer, meta) of out/<stage>, or a one-line error naming the checkpoint and how to make it."""
    path = os.path.join(cfg.out_dir, stage, "model.pt")
    if not os.path.exists(path):
        raise UserError(f"this demo needs the {stage} checkpoint {path}: run `{STAGE_COMMANDS[stage]}` "
                        f"(or `bash run.sh`) first")
    model, tok, meta = load_checkpoint(path)
    return model.eval(), tok, meta


def demo_model(cfg, stage):
    return demo_checkpoint(cfg, stage)[:2]


def complete_text(engine, prompts, cfg, n=1, max_tokens=48, temperature=0.0, stop=()):
    """Base-model completions of text prompts -> list of strings (prompt-major), cut at the first stop."""
    ids = [engine.tok.encode_ordinary(p) for p in prompts]
    done = engine.generate(ids, n=n, max_tokens=max_tokens, temperature=temperature, top_k=50, seed=cfg.seed)
    return [cut_at_stop(engine.tok.decode(c.tokens).replace("<|endoftext|>", ""), stop)[0] for c in done]


def chat_replies(engine, questions, cfg, n=1, temperature=0.0, max_tokens=96, primer=""):
    """Assistant replies (text with tool markup) to one-question conversations; `primer` is text forced at
    the start of the reply, e.g. "The answer is" to make the model answer before it works anything out
    (special tokens in it, e.g. a tool call and its output, are the protocol's tokens)."""
    prompts = [render_for_completion(engine.tok, [{"role": "user", "content": q}]) +
               engine.tok.encode(primer, allowed_special="all") for q in questions]
    done = engine.generate(prompts, n=n, max_tokens=max_tokens, temperature=temperature, top_k=50, seed=cfg.seed)
    return [primer + engine.tok.decode(c.tokens).removesuffix("<|im_end|>") for c in done]


def shown(reply):
    """A reply for the terminal: the tool markup as the chat shows it, on one line."""
    reply = re.sub(r"<\|code_start\|>(.*?)<\|code_end\|>", r"[Analyzed: \1]", reply, flags=re.S)
    reply = re.sub(r"<\|search_start\|>(.*?)<\|search_end\|>", r"[Searching: \1]", reply, flags=re.S)
    reply = re.sub(r"<\|output_start\|>(.*?)<\|output_end\|>", r" [Result: \1]", reply, flags=re.S)
    return " | ".join(line for line in reply.splitlines() if line.strip())


def rate(hits):
    hits = list(hits)
    return f"{sum(hits)} of {len(hits)} = {sum(hits) / max(len(hits), 1):.2f}"


def run_stage_command(module, argv):
    """A demonstration another stage's command already prints: run that command here."""
    import importlib  # the stage files import chat.py, so they are imported only when a demo needs them
    print(f"(this is `python {module}.py {' '.join(argv)}`)")
    return importlib.import_module(module).main(argv)


def stage_command(module, *argv):
    return lambda cfg, name: run_stage_command(module, [a.format(out=cfg.out_dir) for a in argv])


def show_tokens_of(*texts):
    """`tokenizer.py show` for each text, with the tokenizer of --out-dir."""
    shows = [stage_command("tokenizer", "show", text, "--tokenizer", "{out}/tokenizer/tokenizer.json") for text in texts]
    return lambda cfg, name: [show(cfg, name) for show in shows]


# -- the base model: an internet-document simulator (lecture §5) --------------------------------------

def demo_stochastic(cfg, name):
    """I3: sampling is a biased coin per token, so one prompt gives a different document every time."""
    model, tok = demo_model(cfg, "base")
    prompt = "The king"
    for k, text in enumerate(complete_text(Engine(model, tok), [prompt], cfg, n=3, temperature=1.0), 1):
        print(f"--- sample {k} ---\n{prompt}{text}")
    print("The same prompt, three different continuations: remixes of the training text, not copies.")


def demo_next_token(cfg, name):
    """I5: the model's output is a probability for every token of the vocabulary."""
    model, tok = demo_model(cfg, "base")
    for prompt in ("The weather today is", "To be, or not to"):
        print(f"prompt: {prompt!r}")
        with torch.no_grad():
            probs = model(torch.tensor([tok.encode_ordinary(prompt)]))[0][0, -1].softmax(-1)
        best = probs.topk(8)
        print("  " + "  ".join(f"{tok.token_text(i)!r} {p:.1%}" for p, i in zip(best.values.tolist(), best.indices.tolist())))
        print(f"  (the other {len(probs) - 8:,} tokens share {1 - best.values.sum().item():.1%})")
    print("For the step-by-step trace: python chat.py --base 'The king' --probs --max-tokens 8")


def demo_not_assistant(cfg, name):
    """B1: asked a question, the base model does not answer: it continues a document."""
    model, tok = demo_model(cfg, "base")
    prompt = "What is 2+2?"
    replies = complete_text(Engine(model, tok), [prompt], cfg, n=cfg.n, temperature=1.0, max_tokens=32)
    for k, text in enumerate(replies[:3], 1):
        print(f"--- sample {k} ---\n{prompt}{text}")
    print(f"samples containing '4': {rate('4' in r for r in replies)}; distinct samples: "
          f"{len(set(replies))} of {len(replies)} -- it rambles on, differently each time")


# A list the corpus holds in every play: the persons of the drama. Primed with the start of a play's list,
# the base model continues it -- knowledge comes out in the format of a document it has seen.
def demo_priming(cfg, name):
    """B2: knowledge by priming: the start of a "Dramatis Personae" list makes the model recite one."""
    model, tok = demo_model(cfg, "base")
    names = {c[0].split()[0].upper() for c in data.play_characters()}
    prompt = "HAMLET, PRINCE OF DENMARK\n\nDramatis Personae\n\nCLAUDIUS, King of Denmark.\nHAMLET, son to the former, and nephew to the present King.\n"
    replies = complete_text(Engine(model, tok), [prompt], cfg, n=cfg.n, temperature=0.8, max_tokens=64)
    print(prompt + replies[0])
    lines = [line for r in replies for line in r.splitlines()[:6] if "," in line]
    real = [line.split(",")[0].strip().split(" ")[0].upper() in names for line in lines]
    print(f"-- over {len(replies)} samples: {len(lines)} list lines 'NAME, description'; "
          f"names that are real characters of the plays: {rate(real)}")


def match_count(model, tok, passage, prompt_tokens=16, m=48):
    """Greedy continuation of a passage's first prompt_tokens tokens; -> (N tokens equal to the passage at
    the same position, M compared, the continuation as text)."""
    ids = tok.encode_ordinary(passage)
    prompt, truth = ids[:prompt_tokens], ids[prompt_tokens:prompt_tokens + m]
    out = Engine(model, tok).generate(prompt, max_tokens=len(truth), temperature=0.0, seed=0)[0].tokens
    return sum(a == b for a, b in zip(out, truth)), len(truth), tok.decode(prompt), tok.decode(out)


# The lecture's zebra page is regurgitated because the training mix shows it ~10 times. The embedded
# corpus holds nothing that often (its most repeated passage, from Milton's Comus, three times), and the
# tiny run reads its corpus less than once, so this demo repeats one passage on purpose: a copy of the base
# model takes REPEATS ordinary pretraining steps in which every batch also holds the passage.
REPEATED_PASSAGE = ("He that has light within his own clear breast\nMay sit i' the centre, and enjoy bright day:\n"
                    "But he that hides a dark soul and foul thoughts\nBenighted walks under the mid-day sun;\n"
                    "Himself is his own dungeon.")
REPEATS = 10


def demo_regurgitation(cfg, name):
    """B3: a document seen many times is recited nearly verbatim; an unseen one is not."""
    model, tok = demo_model(cfg, "base")
    unseen = next(d for d in data.embedded_documents("val"))[5000:5600]  # a work the base model never read
    for label, text in (("the repeated passage", REPEATED_PASSAGE), ("an unseen passage", unseen)):
        n, m, _, _ = match_count(model, tok, text)
        print(f"base model, {label}: {n} of {m} tokens match the training text")
    passage = tok.encode_ordinary(REPEATED_PASSAGE)
    stream = data.DataLoader(data.shard_pattern("embedded", "train", os.path.join(cfg.out_dir, "shards")), 1, 1)
    rng = random.Random(cfg.seed)
    optimizers = build_optimizers(model, TrainConfig(), "cpu")
    model.train()
    for step in range(REPEATS):  # batch: the passage + 7 random windows of the corpus, as in pretraining
        windows = [passage] + [stream.tokens(s, len(passage)).tolist()
                               for s in (rng.randrange(stream.total - len(passage)) for _ in range(7))]
        x = torch.tensor([w[:-1] for w in windows])
        y = torch.tensor([w[1:] for w in windows])
        model(x, y)[1].backward()
        for o in optimizers:
            o.step()
        model.zero_grad(set_to_none=True)
    model.eval()
    print(f"-- after {REPEATS} more pretraining steps that each also held the passage (seen {REPEATS} times):")
    for label, text in (("the repeated passage", REPEATED_PASSAGE), ("an unseen passage", unseen)):
        n, m, prompt, out = match_count(model, tok, text)
        print(f"{label}: {n} of {m} tokens match the training text = {n / m:.2f}")
        print(f"   prompt {prompt!r}\n   model  {out!r}")


def demo_cutoff(cfg, name):
    """B4: asked about what its data never held, the model still writes -- a parallel universe per sample."""
    model, tok = demo_model(cfg, "base")
    prompt = "In the year 2024 the people of England chose a new king, and his name was"
    replies = complete_text(Engine(model, tok), [prompt], cfg, n=cfg.n, temperature=1.0, max_tokens=12)
    for k, text in enumerate(replies[:4], 1):
        print(f"--- sample {k} ---\n{prompt}{text.splitlines()[0] if text.strip() else text}")
    firsts = Counter(r.split()[0].strip(",.;:") if r.split() else "" for r in replies)
    print(f"-- {len(replies)} samples: {len(firsts)} different first words after 'his name was' "
          f"(most common: {firsts.most_common(3)}); no corpus line can say it (the corpus ends centuries "
          f"before 2024), so every answer is invented")


def play_pairs():
    """(character, play title) pairs of the embedded corpus, one per play, in a fixed order."""
    seen, pairs = set(), []
    for name, _, title in data.play_characters():
        if title not in seen and len(name.split()) == 1:
            seen.add(title)
            pairs.append((name, title))
    return pairs


def demo_few_shot(cfg, name):
    """B5: in-context learning: "Q: Which play is X in? / A: title." pairs, then a new character. The
    pattern is in the context window, not in the weights: the more examples precede the question, the more
    often the model answers with a play and then goes on with a new "Q:"; without them it continues a play.
    As many examples as the context holds (at most 10: a tiny model's window is 256 tokens, and a prompt
    that fills it leaves no room for the answer). Sampled, several times per character: greedy decoding of a
    tiny model loops ("The Life, The Life, ...") and would hide the trend. The tiny model picks up the
    format from the examples (README, "The lecture, demo by demo"), not the plays themselves."""
    model, tok = demo_model(cfg, "base")
    pairs = play_pairs()
    tests, reply_tokens, samples = pairs[10:10 + cfg.n], 24, 4
    questions = [f"Q: Which play is {who} in?\nA:" for who, _ in tests]

    def prefix(shots):
        return "".join(f"Q: Which play is {who} in?\nA: {title}.\n\n" for who, title in pairs[:shots])

    def fits(shots):  # the longest prompt with these examples still leaves room for the answer
        longest = max(len(tok.encode_ordinary(prefix(shots) + q)) for q in questions)
        return longest + reply_tokens <= model.config.seq_len

    most = max(k for k in range(11) if k == 0 or fits(k))
    engine, titles = Engine(model, tok), {title for _, title in pairs}
    print(prefix(most) + questions[0])
    print(f"-- {len(tests)} new characters, {samples} samples each at temperature 0.8, by examples in the context:")
    for shots in sorted({0, most // 2, most}):
        replies = complete_text(engine, [prefix(shots) + q for q in questions], cfg, n=samples, temperature=0.8,
                                max_tokens=reply_tokens)
        truths = [title for _, title in tests for _ in range(samples)]
        answers = [r.split("\n")[0].strip().rstrip(".") for r in replies]
        words = [set(re.findall(r"[a-z]+", a.lower())) for a in answers]
        print(f"  {shots:2d}-shot: the answer is a play's title {rate(a in titles for a in answers)}; the right "
              f"play {rate(bool(w & data.title_keys(t)) for w, t in zip(words, truths))}; the text goes on with a "
              f"new 'Q:' {rate(chr(10) + 'Q:' in r for r in replies)}; e.g. {replies[0][:48]!r}")


ASSISTANT_PAGE = ("A conversation between a helpful AI assistant and a human. The assistant answers every question "
                  "kindly, truthfully and briefly.\n\nHuman: Who wrote Hamlet?\nAssistant: William Shakespeare "
                  "wrote Hamlet.\n\nHuman: What is the sea?\nAssistant: The sea is the great body of salt water "
                  "that covers most of the earth.\n\nHuman: Why is the sky blue?\nAssistant:")


def demo_assistant_by_prompt(cfg, name):
    """B6: an assistant made by a prompt alone: a page of Human/Assistant turns; the base model answers as
    the Assistant, then goes on to invent the human's next turn, unless a stop string ends it there."""
    model, tok = demo_model(cfg, "base")
    engine = Engine(model, tok)
    raw = complete_text(engine, [ASSISTANT_PAGE], cfg, n=cfg.n, temperature=0.8, max_tokens=64)
    print(ASSISTANT_PAGE + raw[0])
    print(f"-- without a stop string, samples that invent the next 'Human:' turn: {rate('Human:' in r for r in raw)}")
    stopped = complete_text(engine, [ASSISTANT_PAGE], cfg, n=1, temperature=0.8, max_tokens=64, stop=("\nHuman:",))
    print(f"with --stop '\\nHuman:' the reply ends where the human's turn would start:\n  Assistant:{stopped[0]}")
    print("in the chat command: python chat.py --base \"$PAGE\" --stop $'\\nHuman:' (the stop string ends the sample)")


# -- the assistant: SFT, hallucinations, tools, thinking (lecture §6) ---------------------------------

def demo_protocol(cfg, name):
    """S5: the lecture's conversation in the chat protocol, as tokens: one 1-D sequence."""
    _, tok = demo_model(cfg, "sft")
    messages = list(data.LECTURE_CONVERSATIONS[0][:2])
    ids, mask = render_conversation(tok, messages)
    print(render_tokens(tok, ids, colour=use_colour()))
    print(f"token ids: {ids}\nloss mask: {mask}\nToken count {len(ids)}, "
          f"{len(render_for_completion(tok, messages[:1]))} for the prompt with the assistant primer "
          f"(the lecture's GPT-4o tokenizer: 49 and 52; its ids are not ours)")


def demo_before_after(cfg, name):
    """S12: the same question to the base model (it continues a document) and to the SFT model (it answers)."""
    base, tok = demo_model(cfg, "base")
    sft, _ = demo_model(cfg, "sft")
    questions = ("What is 2+2?", "What is your name?", "Who is Hamlet?", "Write a line about the sea.")
    as_documents = complete_text(Engine(base, tok), [q + "\n" for q in questions], cfg, max_tokens=32)
    answers = chat_replies(Engine(sft, tok), questions, cfg, max_tokens=48)
    for q, b, a in zip(questions, as_documents, answers):
        print(f"Q: {q}\n  base: {b.strip()[:120]!r}\n  sft:  {shown(a)[:160]}")


# The lecture's four tool prompts, worded as the lecture words them. sft.py measures the same families on
# held-out wordings (`python sft.py eval`: dots_rate, letter_count_rate, every_kth_rate, emily_code_rate).
LECTURE_TOOL_PROMPTS = (
    ("How many dots are here? " + "." * 56, 56),
    ("How many R's in strawberry", 3),
    ("Print every third character of ubiquitous starting from the first.", "uqts"),
    ("Emily buys 23 apples and 177 oranges. Each orange costs $4. The total cost of all the fruit is $869. "
     "What is the cost of each apple? Use code.", 7),
)


def final_answer(reply):
    """What follows the last "The answer is" of a reply (without the final period), or ''. A string answer
    stands on the next line, after "The answer is:" (data.tool_answer)."""
    found = re.findall(r"The answer is:?\s+(\S.*)", reply)
    return found[-1].strip().rstrip(".") if found else ""


def demo_tools(cfg, name):
    """K4-K6: counting, spelling and a word problem through the code tool: the model copies the user's text
    into the call, and the tool -- not the model -- counts."""
    model, tok = demo_model(cfg, "sft")
    engine = Engine(model, tok)
    replies = chat_replies(engine, [q for q, _ in LECTURE_TOOL_PROMPTS], cfg)
    for (question, answer), reply in zip(LECTURE_TOOL_PROMPTS, replies):
        verdict = "right" if final_answer(reply) == str(answer) else f"wrong (expected {answer})"
        print(f"you> {question}\nassistant> {shown(reply)}   <- {verdict}")
    questions = [f"How many dots are here? {'.' * k}" for k in range(1, 81, 80 // cfg.n or 1)]
    counts = [q.count(".") for q in questions]

    def right(replies):
        return rate(final_answer(r) == str(c) for r, c in zip(replies, counts))

    with_tool = chat_replies(engine, questions, cfg)
    alone = chat_replies(Engine(model, tok, copy_guard=False), questions, cfg)
    in_head = chat_replies(engine, questions, cfg, primer="The answer is")  # no room for a call: answer now
    print(f"-- dots 1..80 ({len(questions)} counts): with the code tool {right(with_tool)}; the same with the "
          f"engine's copy guard off {right(alone)}; answered at once, without the tool {right(in_head)}")


def demo_hallucination(cfg, name):
    """H1: the cause of hallucination. An SFT model whose training always answered "Who is X?" confidently
    answers "Who is Orson Kovacs?" confidently too -- something different on every sample; the default SFT
    model, whose data refuses where the base model did not know (interrogation), says it doesn't know."""
    confident, tok = demo_model(cfg, "sft-norefusal")
    careful, _ = demo_model(cfg, "sft")
    names = ["Orson Kovacs"] + [data.invented_name(random.Random(f"{cfg.seed}:{k}"), data.corpus_text_lower())
                                for k in range(cfg.n - 1)]
    questions = [f"Who is {who}?" for who in names]
    for label, model in (("SFT without refusal rows", confident), ("SFT with refusals (default)", careful)):
        replies = chat_replies(Engine(model, tok), questions, cfg, n=3, temperature=1.0, max_tokens=40)
        per_name = [replies[3 * k:3 * k + 3] for k in range(len(names))]
        refused = [any(s in r for s in ("don't believe I know", "I'm sorry")) for r in replies]
        print(f"{label}:")
        for r in per_name[0]:
            print(f"  Who is Orson Kovacs? -> {shown(r)[:110]}")
        print(f"  over {len(names)} invented names x 3 samples: refusals {rate(refused)}; names whose 3 answers "
              f"all differ: {rate(len(set(rs)) == 3 for rs in per_name)}")


def demo_working_memory(cfg, name):
    """H4: vague recollection (the parameters) vs working memory (the context): "which line comes after
    ...?" answered from memory (the reply forced to start 'The next line is: "' at once), then with the
    passage in the context window, pasted as the search tool's result, the way the SFT model learned to
    read it (sft.search_rows). Only the text the model writes after what was forced is judged."""
    model, tok = demo_model(cfg, "sft")
    engine, search = Engine(model, tok), Search()
    rng, items, answer_lead = random.Random(cfg.seed), [], 'The next line is: "'
    while len(items) < cfg.n:
        source, text = rng.choice(search.passages)
        lines = [l.strip() for l in text.splitlines()]
        k = rng.randrange(max(len(lines) - 1, 1))
        if k + 1 < len(lines) and len(lines[k].split()) >= 5 and len(lines[k + 1].split()) >= 3:
            pasted = tok.decode(tool_output_tokens(tok, format_search_results([dict(source=source, text=text)])))
            if f"{lines[k]}\n{lines[k + 1]}" in pasted:  # the passage fits the tool's output whole
                items.append((lines[k], lines[k + 1], pasted))
    questions = [f'Which line comes after "{line}"?' for line, _, _ in items]
    memory = chat_replies(engine, questions, cfg, primer=answer_lead, max_tokens=32)
    leads = [f"<|search_start|>{line}<|search_end|><|output_start|>{pasted}<|output_end|>\n{answer_lead}"
             for line, _, pasted in items]
    context = [chat_replies(engine, [question], cfg, primer=lead, max_tokens=32)[0]  # one each: the leads differ
               for question, lead in zip(questions, leads)]
    # what the model wrote itself, after the forced start
    from_memory = [r[len(answer_lead):] for r in memory]
    in_context = [r[len(lead):] for r, lead in zip(context, leads)]
    print(f'Which line comes after "{items[0][0]}"?  (it is "{items[0][1]}")\n  from memory:  '
          f'{answer_lead}{from_memory[0][:100]}\n  with the passage in the context: {answer_lead}{in_context[0][:100]}')

    def overlap(line, reply):  # the share of the right line's words that the reply's first line holds
        said = set(reply.split("\n")[0].lower().split())
        return sum(w in said for w in line.lower().split()) / len(line.split())

    for how, replies in (("from memory", from_memory), ("with the passage in the context window", in_context)):
        words = sum(overlap(f[1], w) for f, w in zip(items, replies)) / len(items)
        print(f"-- {how}: the right next line {rate(w.startswith(f[1]) for f, w in zip(items, replies))}; "
              f"its words in the reply {words:.2f} on average")


def demo_tokens_to_think(cfg, name):
    """K3: each token gets a fixed amount of compute. Forced to answer first ("The answer is" right away)
    the model fails as the numbers grow; written out step by step it holds up longer, and longer still when
    each step's arithmetic goes to the code tool (the tiny model's own sums are its weak spot)."""
    model, tok = demo_model(cfg, "sft")
    engine = Engine(model, tok)
    print("difficulty (numbers up to) | answer first | step by step | step by step with the code tool")
    for difficulty in (1, 2, 3):
        problems = data.practice_problems(cfg.n, cfg.seed, difficulty, split="heldout")
        questions = [p["question"] for p in problems]
        first = chat_replies(engine, questions, cfg, max_tokens=8, primer="The answer is")
        stepwise = chat_replies(engine, questions, cfg, max_tokens=96)
        with_code = chat_replies(engine, [q + data.USE_CODE for q in questions], cfg, max_tokens=128)
        right = lambda replies: rate(data.extract_answer(r) == p["answer"] for r, p in zip(replies, problems))
        print(f"{difficulty} ({data.number_range(difficulty)[1]:>2}) | {right(first)} | {right(stepwise)} | "
              f"{right(with_code)}")
    print(f"e.g. {questions[0]}\n  answer first: {shown(first[0])}\n  step by step: {shown(stepwise[0])}\n"
          f"  with the code tool: {shown(with_code[0])}")


def demo_jagged(cfg, name):
    """K7: Swiss-cheese capability: "What is bigger 9.11 or 9.9?" sampled many times."""
    model, tok = demo_model(cfg, "sft")
    replies = chat_replies(Engine(model, tok), ["What is bigger 9.11 or 9.9?"], cfg, n=cfg.n, temperature=0.7, max_tokens=40)
    for r in replies[:3]:
        print(f"  -> {shown(r)[:120]}")
    says = Counter("9.9" if re.search(r"9\.9(?!\d)", r) and "9.11" not in r else "9.11" if "9.11" in r and not re.search(r"9\.9(?!\d)", r)
                   else "both/neither" for r in replies)
    print(f"-- {len(replies)} samples name: {dict(says)} (right: 9.9); a model that multiplies 6-digit numbers "
          f"through its tool can still trip on this")


# -- RL and RLHF (lecture §7-§8) -----------------------------------------------------------------------


def demo_rl_thinking(cfg, name):
    """R8: what RL did to the solutions: response length and accuracy over RL steps (out/rl/log.jsonl) and
    the same problem solved by the SFT policy and by the RL policy."""
    demo_model(cfg, "rl")
    rows = [json.loads(line) for line in open(os.path.join(cfg.out_dir, "rl", "log.jsonl"))]
    steps = [r for r in rows if "reward" in r]
    for r in steps[::max(len(steps) // 6, 1)] + steps[-1:]:
        print(f"RL step {r['step']:3d}: fraction of attempts correct {r['reward']:.2f}, mean response length "
              f"{r['length']:.1f} tokens")
    print("(this project's RL has no <think> format: its solutions stay short worked steps -- see README)")


def demo_sft_vs_rl(cfg, name):
    """R9: SFT-style vs RL-style answers: the same held-out problems to both policies, asked as RL practised
    them (its checkpoint's difficulty, with " Use code." where it used the tool)."""
    sft, tok = demo_model(cfg, "sft")
    rl, _, meta = demo_checkpoint(cfg, "rl")
    practice = meta.get("config", {})
    difficulty, use_tool = practice.get("difficulty", data.DEFAULT_DIFFICULTY), practice.get("use_tool", False)
    problems = data.practice_problems(cfg.n, cfg.seed, difficulty, split="heldout")
    questions = [p["question"] + (data.USE_CODE if use_tool else "") for p in problems]
    print(f"{len(problems)} held-out problems at difficulty {difficulty}" +
          (", with the code tool" if use_tool else ""))
    for label, model in (("SFT", sft), ("RL", rl)):
        replies = chat_replies(Engine(model, tok), questions, cfg, max_tokens=96)
        lengths = [len(tok.encode_ordinary(r)) for r in replies]
        print(f"{label}: correct {rate(data.extract_answer(r) == p['answer'] for r, p in zip(replies, problems))}, "
              f"mean length {sum(lengths) / len(lengths):.1f} tokens\n  {questions[0]}\n  -> {shown(replies[0])}")


def demo_discriminator(cfg, name):
    """F7: the discriminator-generator gap: judging is easier than writing. The reward model picks the
    person's favourite of 5 attempts far more often than chance, while the policy's own attempt is rarely
    the best of five."""
    metrics = json.load(open(os.path.join(cfg.out_dir, "rlhf", "metrics.json"))) if os.path.exists(
        os.path.join(cfg.out_dir, "rlhf", "metrics.json")) else demo_model(cfg, "rlhf")
    print(f"judging: the reward model orders a pair of attempts as the person does in "
          f"{metrics['rm_pair_accuracy']:.2f} of held-out pairs (chance 0.50)")
    print(f"writing: the policy's replies score {metrics['true_reward_final']:.2f} with the person "
          f"(started at {metrics['true_reward_sft']:.2f}) on a 0..1 scale")
    print("It is easier to say which of five poems is best than to write the best one: people rank, "
          "and the reward model learns to rank.")


# -- facts and scale (lecture §1, §3) ------------------------------------------------------------------

GPT2_SHAPES = {"124M": (12, 768), "355M": (24, 1024), "774M": (36, 1280), "1.5B": (48, 1600)}  # layers, width
BASE_MODELS_IN_THE_WILD = (("GPT-2 (2019)", "1.6B parameters", "~100B tokens"),
                           ("Llama 3 (2024)", "405B parameters", "15T tokens"),
                           ("DeepSeek-V3 (2024)", "671B parameters", "14.8T tokens"))
GPT2_RUN = (32_000, 1_000_000)  # the lecture's llm.c run: steps x tokens per step


def demo_scale(cfg, name):
    """G12-G18: the plan and the architecture of our base model, beside GPT-2 and today's base models."""
    from train_gpt import GPT2_FACTS, GPT, GPTConfig
    model, tok, meta = demo_checkpoint(cfg, "base")
    train = meta.get("config", {})
    steps, batch = train.get("num_steps", meta.get("step", 0)), train.get("total_batch_tokens", 0)
    print(f"G12 plan: ours {steps:,} steps x {batch:,} tokens = {steps * batch:,} tokens, "
          f"{min(meta.get('step', 0) / max(steps, 1), 1):.0%} done; the lecture's GPT-2 run "
          f"{GPT2_RUN[0]:,} x {GPT2_RUN[1]:,} = {GPT2_RUN[0] * GPT2_RUN[1] / 1e9:.0f}B tokens")
    print("G13 GPT-2's shapes in this architecture (ctx 1024, GPT-2's 50,257 vocab; RoPE, untied head):")
    for label, (depth, width) in GPT2_SHAPES.items():
        with torch.device("meta"):
            params = GPT(GPTConfig(vocab_size=50257, seq_len=1024, n_layer=depth, n_embd=width,
                                   n_head=width // 64, n_kv_head=width // 64)).num_params()
        print(f"  GPT-2 {label:>4}: {depth} layers x {width} wide -> {params / 1e6:,.0f}M parameters here")
    print(f"  ours (tiny): {model.config.n_layer} layers x {model.config.n_embd} wide -> {model.num_params():,}")
    print(f"G14 {GPT2_FACTS}; about $3 per GPU-hour; cheaper now through better data, hardware and software")
    print("G16 base models in the wild: " + "; ".join(" ".join(m) for m in BASE_MODELS_IN_THE_WILD) +
          f"; ours: {model.num_params() / 1e6:.1f}M parameters, {steps * batch / 1e6:.1f}M tokens")
    print("G18 the layers, shape by shape (the lecture's 3-D visualiser, as text):")
    for pname, p in model.named_parameters():
        print(f"  {pname:<40} {tuple(p.shape)}")


PII_EXAMPLE = ("Call Ann at 555-0199 or (415) 555-0134, or write to ann.lee@example.com; she lives at "
               "221 Baker Street. Her SSN is 078-05-1120 and her laptop is on 192.168.0.12.")


def demo_pii(cfg, name):
    """D9: the PII filter's redaction, on one example (data.redact_pii, the funnel's last filter)."""
    print(f"before: {PII_EXAMPLE}\nafter:  {data.redact_pii(PII_EXAMPLE)}")
    print("the whole funnel, filter by filter: python data.py process")


def demo_token_stream(cfg, name):
    """T13: what the model actually reads: the corpus as one stream of token ids."""
    data.show_token_stream(data.shard_pattern("embedded", "train", os.path.join(cfg.out_dir, "shards")),
                           os.path.join(cfg.out_dir, "tokenizer", "tokenizer.json"))


# -- the tour, in the lecture's order ------------------------------------------------------------------

LECTURE_DEMOS = [
    LectureDemo("D9", "pii", "an e-mail, phones, a street address, an SSN and an IP redacted", demo_pii),
    LectureDemo("T6", "compression", "~5000 characters as bits, bytes, our tokens (and GPT-4's)",
                stage_command("tokenizer", "compare", "--tokenizer", "{out}/tokenizer/tokenizer.json")),
    LectureDemo("T7", "tokens", "tiktokenizer-style chunks, the ids, 'Token count N', whitespace shown",
                stage_command("tokenizer", "show", "The weather today is sunny.  Isn't it?", "--whitespace",
                              "--tokenizer", "{out}/tokenizer/tokenizer.json")),
    LectureDemo("T8", "spaces-and-case", "'hello world', 'helloworld', a double space, 'Hello World': other tokens",
                show_tokens_of(*("hello world", "helloworld", "hello  world", "Hello World"))),
    LectureDemo("T12", "subwords", "'Ubiquitous' and 'strawberry' split into sub-word chunks",
                show_tokens_of(*("Ubiquitous", "How many R's in strawberry"))),
    LectureDemo("T13", "token-stream", "the first token ids of the training shards, as the model reads them",
                demo_token_stream),
    LectureDemo("G7", "nudge", "next-token probabilities before/after one update (the true token goes up)",
                stage_command("train_gpt", "demo", "--checkpoint", "{out}/base")),
    LectureDemo("G12-G18", "scale", "the plan and % done, GPT-2 shapes, 405B/671B base models, every layer's shape",
                demo_scale),
    LectureDemo("I3", "stochastic", "one prompt, three different continuations", demo_stochastic),
    LectureDemo("I5", "next-token", "the top next-token probabilities for a prompt", demo_next_token),
    LectureDemo("B1", "not-an-assistant", "'What is 2+2?' -> the base model rambles, differently each time",
                demo_not_assistant),
    LectureDemo("B2", "priming", "a play's list of persons recited from a primed start; share of real names",
                demo_priming),
    LectureDemo("B3", "regurgitation", "'N of M tokens match the training text' on a passage seen 10 times vs unseen",
                demo_regurgitation),
    LectureDemo("B4", "cutoff", "an event after the data ends: a different invented answer per sample", demo_cutoff),
    LectureDemo("B5", "few-shot", "'character: play' examples, then a new character: rates by examples in the context",
                demo_few_shot),
    LectureDemo("B6", "assistant-page", "a Human/Assistant page makes an assistant; a stop string ends its turn",
                demo_assistant_by_prompt),
    LectureDemo("S5", "protocol", "the lecture's conversation as protocol tokens, ids, mask and count", demo_protocol),
    LectureDemo("S12", "before-after", "the same questions to the base model and to the SFT model", demo_before_after),
    LectureDemo("H1", "hallucination", "'Who is Orson Kovacs?': SFT without refusals invents, SFT with refuses",
                demo_hallucination),
    LectureDemo("H4", "working-memory", "'which line comes after ...?' from memory vs with the passage in context",
                demo_working_memory),
    LectureDemo("K3", "tokens-to-think", "answer-first vs step-by-step accuracy as the numbers grow",
                demo_tokens_to_think),
    LectureDemo("K4-K6", "tools", "the lecture's dots, strawberry, ubiquitous and Emily prompts through code",
                demo_tools),
    LectureDemo("K7", "jagged", "'What is bigger 9.11 or 9.9?' over many samples", demo_jagged),
    LectureDemo("R8", "rl-curves", "accuracy and response length over RL steps", demo_rl_thinking),
    LectureDemo("R9", "sft-vs-rl", "the same problems solved by the SFT and the RL policy", demo_sft_vs_rl),
    LectureDemo("F5", "reward-example", "scores 0.1 0.8 0.3 0.4 0.5 vs order 2 1 3 5 4, one update's nudge",
                stage_command("rlhf", "demo", "reward-example")),
    LectureDemo("F7", "discriminator", "judging (RM pair accuracy) vs writing (the policy's true reward)",
                demo_discriminator),
    LectureDemo("F8", "reward-hacking", "proxy reward up, true reward down, the top sample degenerate",
                stage_command("rlhf", "demo", "reward-hacking", "--out-dir", "{out}/rlhf")),
]


def demo_main(argv):
    """`python chat.py demo NAME [--flags]` / `python chat.py demo --list`: the lecture, demo by demo."""
    names = {d.name: d for d in LECTURE_DEMOS}
    name = argv[0] if argv and not argv[0].startswith("-") else None
    cfg = parse_config(DemoConfig, argv[1:] if name else argv, prog="chat.py demo",
                       description=demo_main.__doc__ + "\n\n" + "\n".join(
                           f"  {d.name:<18} [{d.spec}] {d.shows}" for d in LECTURE_DEMOS))
    if cfg.list or name is None:
        for d in LECTURE_DEMOS:
            print(f"{d.name:<18} [{d.spec}] {d.shows}")
        return
    if name not in names:
        raise UserError(f"no demo {name!r}; `python chat.py demo --list` lists them")
    demo = names[name]
    require_positive(cfg, ["n"])
    print(f"== [{demo.spec}] {demo.name}: {demo.shows}")
    demo.run(cfg, name)


def main(argv):
    if argv and argv[0] == "demo":
        return demo_main(argv[1:])
    cfg = parse_config(ChatConfig, argv, prog="chat.py", description=__doc__, aliases={"prompt": "-p", "n": "-n"})
    if cfg.web:
        return serve(cfg)
    rt = setup_runtime(cfg.device)
    model, tok, _ = load_checkpoint(find_checkpoint(cfg.checkpoint, bool(cfg.base)), device=rt.device)
    model.eval()
    if cfg.base:
        return base_mode(model, tok, cfg)
    engine = Engine(model, tok, Search(cfg.search_folder or None) if cfg.search_folder else None, cfg.memory_gb)
    if cfg.prompt:
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + \
            [{"role": "user", "content": cfg.prompt}]
        try:
            _, prompt, _ = fit_history(tok, messages, cfg.max_tokens, model.config.seq_len)
        except ValueError as e:
            raise UserError(f"-p: {e}") from None
        reply(engine, prompt, cfg, Terminal())
        return
    chat_loop(engine, cfg)


if __name__ == "__main__":
    run_cli(main)
