"""
evals.py -- the exam: the standard benchmarks people compare models by, with their uncertainty.

Losses and our own synthetic rates say how a model improves, but not how it compares: for that the field
uses shared exams. A base model (a document simulator) is asked which continuation of a text it finds most
likely -- no generation, just the log-probability it gives each offered choice:
  * HellaSwag: which of 4 endings continues an everyday scene ("acc", and "acc_norm", the log-probability
    per token of the ending, so long endings are not punished for being long: the figure llm.c quotes);
  * ARC-Easy / ARC-Challenge: grade-school science questions, 3 to 5 answers each.
A chat model is examined the way one asks a person:
  * MMLU and ARC as multiple choice: the question and lettered answers as a user turn; the model's answer is
    the letter it gives most probability as the first token of its reply (nanochat's "categorical" way);
  * GSM8K: 1,319 grade-school word problems, answered freely (with the code tool allowed) and marked right
    when the number on the reply's "The answer is ..." line equals the key.

Every score comes with what it takes to read it honestly: its sample size n, the score of random guessing
(the baseline), a 95% interval (Wilson's, for a share of n independent right/wrong answers), and a
contamination check -- the share of exam items that share a 13-token stretch with the training data (a
model that read the answers is not taking an exam). A centred mean over the tasks, (score - baseline) /
(1 - baseline), puts the tasks on one scale where 0 is chance and 1 is perfect: the "CORE-style" mean for
base models and the "ChatCORE-style" mean for chat models (nanochat's CORE averages 22 tasks; ours only
the tasks above, so the numbers are alike in kind, not comparable in value).

Each test split is downloaded once, through data.hf_url and data.download (so $HF_ENDPOINT can point at
a mirror, or at a local folder of fixtures standing in for the Hub), into --data-dir.

    python evals.py --checkpoint out/base                  # HellaSwag, ARC-Easy, ARC-Challenge, CORE-style
    python evals.py --checkpoint out/sft                   # MMLU, ARC, GSM8K (code tool), ChatCORE-style
    python evals.py --checkpoint out/sft --limit 200       # PARTIAL: a seeded sample of 200 items per task
    python evals.py --checkpoint out/base --shots 5        # few-shot: 5 solved items of the set first
    python evals.py write-fixtures DIR [ROWS]              # stand-in Hub files (for tests and rehearsals)
"""
import glob
import json
import math
import os
import random
import re
import signal
import sys
import time
import urllib.parse
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
from chat import Engine, assistant_content
from tokenizer import render_for_completion
from train_gpt import UserError, distributed_stage, load_checkpoint, opt, parse_config, run_cli, setup_runtime

# ====================================================================================================
# The tasks: where each test split lives on the Hub, and how its rows become exam items
# ====================================================================================================
# An item is {"context", "choices", "gold"} for multiple choice (gold = index of the right choice) or
# {"question", "answer"} for GSM8K; every item also has "text", what the contamination check looks for.
# HellaSwag's test labels are secret, so like every peer we use its validation split (10,042 items).


def hellaswag_items(rows):
    return [{"context": r["ctx"], "choices": list(r["endings"]), "gold": int(r["label"]),
             "text": r["ctx"] + " " + r["endings"][int(r["label"])]} for r in rows]


def arc_items(rows):
    items = []
    for r in rows:
        labels = list(r["choices"]["label"])
        if r["answerKey"] not in labels:
            raise data.DataError(f"ARC item {r.get('id')}: answerKey {r['answerKey']!r} is not one of {labels}")
        gold = labels.index(r["answerKey"])
        texts = list(r["choices"]["text"])
        items.append({"question": r["question"], "choices": texts, "gold": gold,
                      "text": r["question"] + " " + texts[gold]})
    return items


def mmlu_items(rows):
    return [{"question": r["question"], "choices": list(r["choices"]), "gold": int(r["answer"]),
             "subject": r["subject"], "text": r["question"] + " " + r["choices"][int(r["answer"])]} for r in rows]


def gsm8k_answer(solution):
    """The key of a GSM8K solution: the number after its final "#### ", read by the same extractor as the
    model's replies (so "1,000" and "1000" are the same number on both sides)."""
    return data.extract_answer(f"{data.ANSWER_PREFIX} {solution.rsplit('####', 1)[-1]}")


def gsm8k_items(rows):
    return [{"question": r["question"], "answer": gsm8k_answer(r["answer"]),
             "text": r["question"] + " " + r["answer"]} for r in rows]


@dataclass(frozen=True)
class Task:
    repo: str       # the Hugging Face dataset
    path: str       # the file of its test split inside the repo
    columns: tuple  # the columns we read (a file without them is the wrong file)
    items: object   # rows -> items
    size: int       # rows in the real file, to tell a partial run from a full one at a glance


TASKS = {
    "hellaswag": Task("Rowan/hellaswag", "data/validation-00000-of-00001.parquet", ("ctx", "endings", "label"),
                      hellaswag_items, 10042),
    "arc_easy": Task("allenai/ai2_arc", "ARC-Easy/test-00000-of-00001.parquet", ("id", "question", "choices", "answerKey"),
                     arc_items, 2376),
    "arc_challenge": Task("allenai/ai2_arc", "ARC-Challenge/test-00000-of-00001.parquet",
                          ("id", "question", "choices", "answerKey"), arc_items, 1172),
    "mmlu": Task("cais/mmlu", "all/test-00000-of-00001.parquet", ("question", "subject", "choices", "answer"),
                 mmlu_items, 14042),
    "gsm8k": Task("openai/gsm8k", "main/test-00000-of-00001.parquet", ("question", "answer"), gsm8k_items, 1319),
}
BASE_TASKS = ("hellaswag", "arc_easy", "arc_challenge")
CHAT_TASKS = ("mmlu", "arc_easy", "arc_challenge", "gsm8k")


def hf_endpoint():
    """The base URL every download goes through (data.hf_url's): the Hub, or whatever HF_ENDPOINT names."""
    return os.environ.get("HF_ENDPOINT", data.DEFAULT_HF_ENDPOINT).rstrip("/")


def data_file(name, data_dir):
    """The local copy of a task's split, downloaded on first use, as data_dir/<server>/<repo>/<path>. The
    server is part of the path so that files from a stand-in server (fixtures) are never later read as the
    Hub's, and the repo path keeps the two ARC files (both test-00000-of-00001.parquet) apart."""
    task, url = TASKS[name], urllib.parse.urlsplit(hf_endpoint())
    server = re.sub(r"[^A-Za-z0-9.-]+", "_", url.netloc + url.path).strip("_")
    return data.download(data.hf_url(task.repo, task.path), os.path.join(data_dir, server, task.repo, task.path))


def read_rows(path, columns):
    """The rows of a parquet file as dicts; a truncated or foreign file is one clear line."""
    import pyarrow.parquet as pq  # only the evals read parquet here; data.py imports it the same way
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow reports a damaged file as ArrowInvalid, a ValueError
        raise data.DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]}); "
                             "delete it to download it again") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise data.DataError(f"{path}: lacks the columns {missing} (has {table.column_names}): not this task's file")
    return table.select(list(columns)).to_pylist()


def load_items(name, data_dir):
    path = data_file(name, data_dir)
    try:
        items = TASKS[name].items(read_rows(path, TASKS[name].columns))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise data.DataError(f"{path}: a row does not fit the {name} schema ({type(e).__name__}: {e})") from None
    if not items:
        raise data.DataError(f"{path}: no rows")
    return items


def sample_items(items, limit, seed):
    """All items, or a seeded sample of `limit` of them (in file order). A sample and not the first N: the
    files are sorted (MMLU starts with 100 abstract-algebra questions), so the first N would be one topic."""
    if not limit or limit >= len(items):
        return list(range(len(items)))
    return sorted(random.Random(f"evals:{seed}").sample(range(len(items)), limit))


# ====================================================================================================
# The numbers: interval, baseline, centred mean
# ====================================================================================================

Z95 = 1.959964  # 95% of a normal distribution lies within this many standard deviations of its mean


def wilson_interval(correct, n, z=Z95):
    """95% interval for a share of right answers. Wilson's interval rather than p +- z*sqrt(p(1-p)/n): it
    stays inside [0, 1] and is not of zero width at 0/n or n/n, which matter here (a small model scores
    0 of 200 on GSM8K, and 0/200 does not prove the true rate is exactly 0)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def centred(score, baseline):
    """0 = random guessing, 1 = every answer right (negative: worse than guessing)."""
    return (score - baseline) / (1 - baseline)


def centred_mean(figures):
    """Mean of the centred scores of [(score, baseline, n)], with a 95% interval from the binomial variance
    of each score (the tasks are independent samples, so their variances add)."""
    values = [centred(s, b) for s, b, _ in figures]
    var = sum(s * (1 - s) / max(n, 1) / (1 - b) ** 2 for s, b, n in figures) / len(figures) ** 2
    mean = sum(values) / len(values)
    return mean, mean - Z95 * math.sqrt(var), mean + Z95 * math.sqrt(var)


# ====================================================================================================
# Scoring
# ====================================================================================================

def gather(values, rt):
    """Every rank's list of (item index, result) -> the whole list, in item order, on every rank."""
    if rt.world > 1:
        parts = [None] * rt.world
        dist.all_gather_object(parts, values)
        values = [v for part in parts for v in part]
    return [v for _, v in sorted(values, key=lambda iv: iv[0])]


@torch.no_grad()
def continuation_logprobs(model, rt, pairs, batch_size):
    """pairs: [(context ids, continuation ids)] -> [(sum of log p of the continuation's tokens, their
    count)]. One forward pass reads context + continuation; the log-probabilities the model gave each
    continuation token at the position before it are summed. A sequence longer than the context window
    loses the start of its context (the continuation always stays whole)."""
    keep = model.config.seq_len + 1  # the model reads seq_len tokens; the +1 is the last one's target
    results = []
    for start in range(0, len(pairs), batch_size):
        seqs = [(ids, min(len(cont), len(ids) - 1)) for ctx, cont in pairs[start:start + batch_size]
                for ids in [(ctx + cont)[-keep:]]]
        width = max(len(ids) for ids, _ in seqs) - 1
        x = torch.zeros(len(seqs), width, dtype=torch.long)
        y = torch.full((len(seqs), width), -1, dtype=torch.long)  # -1: not part of any continuation
        for row, (ids, n_cont) in enumerate(seqs):
            x[row, :len(ids) - 1] = torch.tensor(ids[:-1])
            y[row, len(ids) - 1 - n_cont:len(ids) - 1] = torch.tensor(ids[-n_cont:])
        x, y = x.to(rt.device), y.to(rt.device)
        with rt.autocast():
            logits, _ = model(x)
        logp = -F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-1, reduction="none")
        counts = (y >= 0).sum(1)
        results += list(zip(logp.sum(1).tolist(), counts.tolist()))
    return results


def loglik_context(name, item):
    """How a base model is shown an item: as the start of a document it should continue."""
    return item["context"] if name == "hellaswag" else f"Question: {item['question']}\nAnswer:"


def few_shot_prefix(name, items, index, shots, seed):
    """`shots` other items of the same set with their right answers, before the item itself: a base model
    learns the format from them in context. The examples are a pure function of (seed, item index)."""
    if not shots:
        return ""
    drawn = random.Random(f"shots:{seed}:{index}").sample(range(len(items)), min(shots + 1, len(items)))
    chosen = [i for i in drawn if i != index][:shots]  # never the item itself
    return "".join(loglik_context(name, items[i]) + " " + items[i]["choices"][items[i]["gold"]] + "\n\n"
                   for i in chosen)


def score_loglik(model, tok, rt, name, items, indices, cfg):
    """Base-model multiple choice: the choice with the highest log-probability (acc) and with the highest
    log-probability per token (acc_norm) -> [(acc hit, acc_norm hit)] per item of `indices`."""
    mine = indices[rt.rank::rt.world]
    pairs = []
    for i in mine:
        item = items[i]
        context = tok.encode(few_shot_prefix(name, items, i, cfg.shots, cfg.seed) + loglik_context(name, item))
        pairs += [(context, tok.encode(" " + choice)) for choice in item["choices"]]
    scores = continuation_logprobs(model, rt, pairs, cfg.batch_size)
    results, at = [], 0
    for i in mine:
        k = len(items[i]["choices"])
        sums = [s for s, _ in scores[at:at + k]]
        means = [s / max(n, 1) for s, n in scores[at:at + k]]
        gold = items[i]["gold"]
        results.append((i, (int(np.argmax(sums)) == gold, int(np.argmax(means)) == gold)))
        at += k
    return gather(results, rt)


LETTERS = "ABCDEFGH"


def letter_prompt(tok, item):
    """A multiple-choice question as a user turn, ready for the assistant's first token."""
    options = "".join(f"\n{LETTERS[j]}. {choice}" for j, choice in enumerate(item["choices"]))
    question = f"{item['question']}{options}\nAnswer with the letter of the right choice."
    return render_for_completion(tok, [{"role": "user", "content": question}])


@torch.no_grad()
def score_letters(model, tok, rt, items, indices, cfg):
    """Chat-model multiple choice ("categorical"): one forward pass per question; the answer is whichever
    of the offered letters gets the highest logit as the reply's first token. The model is never asked to
    produce anything else, so a model that has not learned the format still gets a fair (chance) score.
    A prompt longer than the context window loses the start of its question (the choices stay)."""
    letter_ids = [tok.encode(letter)[0] for letter in LETTERS]
    mine = indices[rt.rank::rt.world]
    cap = model.config.seq_len
    results = []
    for start in range(0, len(mine), cfg.batch_size):
        batch = mine[start:start + cfg.batch_size]
        prompts = [letter_prompt(tok, items[i])[-cap:] for i in batch]
        x = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
        for row, ids in enumerate(prompts):
            x[row, :len(ids)] = torch.tensor(ids)  # right padding: the causal mask hides it from real tokens
        with rt.autocast():
            logits, _ = model(x.to(rt.device))
        for row, i in enumerate(batch):
            k = len(items[i]["choices"])
            last = logits[row, len(prompts[row]) - 1, letter_ids[:k]]
            results.append((i, int(last.argmax()) == items[i]["gold"]))
    return gather(results, rt)


MIN_REPLY_ROOM = 64  # GSM8K: a prompt is cut (from the start) to leave at least this many tokens for the reply


def score_gsm8k(model, tok, rt, items, indices, cfg):
    """Generative: greedy replies (temperature 0: the same checkpoint always gives the same replies), with
    the engine running the code tool whenever the model calls it. "Use code." is appended, as in SFT's
    tool examples and RL's prompts; the reply's "The answer is ..." number must equal the key.
    -> [(hit, prompt was cut to fit)] per item."""
    engine, cap = Engine(model, tok), model.config.seq_len
    mine = indices[rt.rank::rt.world]
    prompts = {i: render_for_completion(tok, [{"role": "user", "content": items[i]["question"] + data.USE_CODE}])
               for i in mine}
    order = sorted(mine, key=lambda i: len(prompts[i]))  # similar lengths batch with little padding
    results = []
    for start in range(0, len(order), cfg.batch_size):
        batch = order[start:start + cfg.batch_size]
        cut = [prompts[i][-(cap - MIN_REPLY_ROOM):] for i in batch]
        # The engine left-pads the batch to its longest prompt; the replies get the rest of the window.
        room = min(cfg.max_tokens, cap - max(map(len, cut)))
        completions = engine.generate(cut, n=1, max_tokens=room, temperature=0.0, seed=cfg.seed)
        for i, ids, completion in zip(batch, cut, completions):
            got = data.extract_answer(assistant_content(tok, completion))
            results.append((i, (got is not None and got == items[i]["answer"], len(ids) < len(prompts[i]))))
    return gather(results, rt)


def baseline_of(name, items, indices):
    """The expected score of guessing uniformly among each item's choices (GSM8K: 0)."""
    if name == "gsm8k":
        return 0.0
    return sum(1 / len(items[i]["choices"]) for i in indices) / len(indices)


def figure(key, hits, baseline):
    """One score's flat metrics: the share right, its interval, n and the baseline."""
    n, correct = len(hits), int(sum(hits))
    lo, hi = wilson_interval(correct, n)
    return {key: correct / n, f"{key}_lo": lo, f"{key}_hi": hi, f"{key}_n": n, f"{key}_baseline": baseline}


def evaluate_task(model, tok, rt, name, items, indices, chat, cfg):
    """Score one task -> its flat metrics (figure name -> value)."""
    baseline = baseline_of(name, items, indices)
    if name == "gsm8k":
        results = score_gsm8k(model, tok, rt, items, indices, cfg)
        return {**figure("gsm8k_acc", [h for h, _ in results], baseline),
                "gsm8k_prompts_cut": sum(c for _, c in results)}
    if chat and name != "hellaswag":  # HellaSwag has no question to letter: it stays a continuation task
        return figure(f"{name}_acc", score_letters(model, tok, rt, items, indices, cfg), baseline)
    results = score_loglik(model, tok, rt, name, items, indices, cfg)
    metrics = figure(f"{name}_acc", [a for a, _ in results], baseline)
    if name == "hellaswag":  # the length-normalised figure is HellaSwag's usual headline
        metrics.update(figure("hellaswag_acc_norm", [b for _, b in results], baseline))
    return metrics


HEADLINE = {"hellaswag": "hellaswag_acc_norm", "arc_easy": "arc_easy_acc", "arc_challenge": "arc_challenge_acc",
            "mmlu": "mmlu_acc", "gsm8k": "gsm8k_acc"}  # the figure of each task that enters the centred mean


# ====================================================================================================
# Contamination: does the training data contain the exam?
# ====================================================================================================
# Every 13-token window of every exam item is hashed into one sorted array; the training tokens then
# stream past once, every 13-token window of theirs is hashed the same way and looked up (a binary search
# per window, vectorised with numpy). An item counts as seen when any one of its windows occurs in training.
# 13 tokens is long enough that a shared window is no accident of common phrasing (GPT-3's study used 13
# words) yet short enough to catch a question quoted inside a longer document. Items shorter than 13
# tokens cannot be checked and count as unseen.

HASH_MULTIPLIER = np.uint64(0x100000001B3)  # an odd 64-bit multiplier (FNV's prime): windows mix well
SCAN_CHUNK = 1 << 22                        # training tokens hashed per numpy pass (~100 MB of temporaries)


def window_hashes(tokens, n):
    """A 64-bit hash of every n-token window of `tokens` (a polynomial in the token ids, modulo 2^64)."""
    t = np.asarray(tokens, dtype=np.uint64)
    if len(t) < n:
        return np.empty(0, dtype=np.uint64)
    h = np.zeros(len(t) - n + 1, dtype=np.uint64)
    for j in range(n):  # numpy's uint64 arithmetic wraps around silently: exactly "modulo 2^64"
        h = h * HASH_MULTIPLIER + t[j:len(t) - n + 1 + j]
    return h


class OverlapIndex:
    """The n-gram windows of exam items, and which items training has been seen to contain."""

    def __init__(self, item_tokens, n):
        """item_tokens: {key: token ids} (key: any label of an item, e.g. (task, index))."""
        self.n, self.keys, self.seen = n, list(item_tokens), set()
        hashes = [window_hashes(ids, n) for ids in item_tokens.values()]
        owner = np.concatenate([np.full(len(h), k, dtype=np.int64) for k, h in enumerate(hashes)] or [np.empty(0, np.int64)])
        hashes = np.concatenate(hashes or [np.empty(0, np.uint64)])
        order = np.argsort(hashes, kind="stable")
        self.hashes, self.owner = hashes[order], owner[order]

    def scan(self, tokens):
        """Mark every item one of whose windows occurs in `tokens`."""
        if not len(self.hashes):
            return
        h = window_hashes(tokens, self.n)
        at = np.searchsorted(self.hashes, h).clip(max=len(self.hashes) - 1)
        for hit in np.unique(h[self.hashes[at] == h]):
            lo, hi = np.searchsorted(self.hashes, hit, "left"), np.searchsorted(self.hashes, hit, "right")
            self.seen.update(self.keys[k] for k in self.owner[lo:hi])

    def scan_stream(self, stream):
        """Scan a long token array in chunks; consecutive chunks overlap by n-1 tokens, so no window is lost."""
        for start in range(0, max(len(stream) - self.n + 1, 0), SCAN_CHUNK):
            self.scan(stream[start:start + SCAN_CHUNK + self.n - 1])


def conversation_text(row):
    return "\n".join(m["content"] for m in row["messages"])


def jsonl_texts(path):
    """The text of each row of a JSONL file: a document's "text", a conversation's messages, or a problem's
    "question" and "answer" (RL's GSM8K file). A row with none of them is a mistake named by its line."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if "messages" in row:
                        yield conversation_text(row)
                    elif "text" in row or "question" in row:
                        yield row.get("text") or f"{row['question']} {row.get('answer', '')}"
                    else:
                        raise ValueError('expected "text", "messages" or "question"')
                except (ValueError, TypeError, KeyError, AttributeError) as e:
                    raise data.DataError(f"{path}:{lineno}: not a training row ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise data.DataError(f"--train-texts {path}: cannot read ({e})") from None


def training_texts(cfg):
    """Post-training text besides the pretraining shards: --train-texts files (JSONL of conversations such
    as SFT's --data, of documents or of problems such as RL's GSM8K train file; .txt; .parquet) and, with --generated N, N examples of
    each of data.py's model-free SFT generators plus N RL practice problems: the kinds of text the tiny
    preset trains on. Left out, because the pretraining shards already hold their text: the verse requests
    (their replies are lines of the corpus), the unknown-name refusals (a fixed template around made-up
    syllables, and 16 ms each to draw) and sft.py's questions about the plays' characters."""
    for path in cfg.train_texts:
        if path.endswith(".jsonl"):
            yield from jsonl_texts(path)
        else:
            yield from (d["text"] for d in data.read_documents([path]) if "text" in d)
    rng = random.Random(f"generated:{cfg.seed}")
    makers = (data.identity_conversation, data.word_problem_conversation, data.arithmetic_conversation,
              data.mental_arithmetic_conversation, data.counting_conversation, data.lecture_conversation,
              lambda r: data.word_problem_conversation(r, use_tool=True))
    for make in makers:
        for _ in range(cfg.generated):
            yield conversation_text(make(rng))
    if cfg.generated:
        for p in data.practice_problems(cfg.generated, cfg.seed):
            yield p["question"] + "\n" + p["tool_solution"]


def training_shards(cfg):
    """The pretraining shard files; a pattern that matches nothing is a mistake worth stopping for."""
    for pattern in cfg.train_shards:
        if not glob.glob(pattern):
            raise UserError(f"--train-shards {pattern}: no token shards match (the pretraining data the "
                            "contamination check reads; --no-contamination skips it)")
    return sorted(p for pattern in cfg.train_shards for p in glob.glob(pattern))


def contamination(tok, exams, cfg, log=print):
    """exams: {task: (items, indices)} -> {task: number of its evaluated items seen in training}."""
    t0 = time.time()
    index = OverlapIndex({(name, i): tok.encode(items[i]["text"]) for name, (items, indices) in exams.items()
                          for i in indices}, cfg.ngram)
    shards = training_shards(cfg)
    tokens = 0
    for path in shards:
        stream = data.read_shard(path)
        index.scan_stream(stream)
        tokens += len(stream)
    texts = 0
    for text in training_texts(cfg):  # short texts: one scan each (windows never straddle two texts)
        index.scan(tok.encode(text))
        texts += 1
    log(f"contamination check: {tokens:,} pretraining tokens in {len(shards)} shard(s) + {texts:,} post-training "
        f"texts against {len(index.hashes):,} {cfg.ngram}-token windows of the exam items "
        f"({time.time() - t0:.1f}s)")
    return {name: sum(1 for task, _ in index.seen if task == name) for name in exams}


# ====================================================================================================
# Published figures of the peers, printed beside ours (each with where it was published)
# ====================================================================================================

LLMC = "llm.c discussion #481 (2024-05-28)"
NANOCHAT = "nanochat d20 launch report card (Oct 2025)"
REFERENCES = {  # (peer, stage) -> {figure: (value, who, source)}
    ("gpt2-124m", "base"): {"hellaswag_acc_norm": [(0.294, "OpenAI GPT-2 124M", LLMC),
                                                   (0.299, "llm.c GPT-2 124M repro", LLMC)]},
    ("nanochat-d20", "base"): {"core": [(0.2219, "nanochat d20 (CORE: 22 tasks, ours: 3)", NANOCHAT)]},
    ("nanochat-d20", "sft"): {"arc_easy_acc": [(0.3876, "nanochat d20 SFT", NANOCHAT)],
                              "arc_challenge_acc": [(0.2807, "nanochat d20 SFT", NANOCHAT)],
                              "mmlu_acc": [(0.3151, "nanochat d20 SFT", NANOCHAT)],
                              "gsm8k_acc": [(0.0455, "nanochat d20 SFT", NANOCHAT)],
                              "chatcore": [(0.0884, "nanochat d20 SFT (ChatCORE incl. HumanEval)", NANOCHAT)]},
    ("nanochat-d20", "rl"): {"gsm8k_acc": [(0.0758, "nanochat d20 RL", NANOCHAT)]},
}
PEER_OF_DEPTH = {12: "gpt2-124m", 20: "nanochat-d20"}  # our d12 is GPT-2-small sized; d20 is nanochat's d20


def references_for(n_layer, stage):
    return REFERENCES.get((PEER_OF_DEPTH.get(n_layer), stage), {})


# ====================================================================================================
# Output: the table on screen, metrics.json, and the report card's stage x task table
# ====================================================================================================

FIGURE_ORDER = ("hellaswag_acc", "hellaswag_acc_norm", "arc_easy_acc", "arc_challenge_acc", "mmlu_acc",
                "gsm8k_acc", "core", "chatcore")
OVERLAP_FLAG = 0.01  # above 1% of items seen in training, a score is flagged


def task_of(key):
    return next((t for t in TASKS if key.startswith(t + "_")), None)


def result_lines(metrics):
    """The on-screen table: one row per figure, everything needed to read it."""
    lines = []
    if metrics["partial"]:
        lines.append(f"PARTIAL: --limit {metrics['limit']}: a seeded sample of at most {metrics['limit']} items per "
                     "task, not the full test sets; the interval says how far the full-set score may lie")
    if metrics["hf_endpoint"] != data.DEFAULT_HF_ENDPOINT:
        lines.append(f"data: HF_ENDPOINT={metrics['hf_endpoint']} -- these are scores on whatever files that "
                     "server holds, not on the benchmarks as published on the Hugging Face Hub")
    lines.append(f"{'figure':<20} {'score':>6}  {'95% interval':<15} {'n':>6} {'chance':>6}  "
                 f"{'seen in training':<18} published")
    refs = references_for(metrics["n_layer"], metrics["stage"])
    for key in FIGURE_ORDER:
        if key not in metrics:
            continue
        task = task_of(key)
        n = metrics.get(f"{key}_n", "")
        base = metrics.get(f"{key}_baseline")
        seen = ""
        if task and f"{task}_overlap" in metrics:
            share = metrics[f"{task}_overlap"]
            seen = f"{100 * share:.1f}%" + (" FLAG >1%" if share > OVERLAP_FLAG else "")
        published = "; ".join(f"{who} {v:.3f} ({src})" for v, who, src in refs.get(key, []))
        lines.append(f"{key:<20} {metrics[key]:>6.3f}  [{metrics[key + '_lo']:.3f}, {metrics[key + '_hi']:.3f}]  "
                     f"{n:>6} {'' if base is None else f'{base:.3f}':>6}  {seen:<18} {published}")
    return lines


def write_json(path, obj):
    with data.atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


REPORT_STAGES = ("base", "sft", "rl", "rlhf")
TABLE_FILE = "table.md"  # <root>/evals/table.md: report_table(root), rewritten after every run, for the report card


def report_table(root):
    """The report card's exam table -> markdown lines: one row per stage that has root/evals/<stage>/
    metrics.json, one column per figure, "score ±half-interval" in each cell (* = partial, ! = more than
    1% of the items seen in training), then the peers' published figures where the model has a peer."""
    stages = {}
    for stage in REPORT_STAGES:
        path = os.path.join(root, "evals", stage, "metrics.json")
        if os.path.exists(path):
            with open(path) as f:
                stages[stage] = json.load(f)
    if not stages:
        return []
    keys = [k for k in FIGURE_ORDER if any(k in m for m in stages.values())]
    lines = ["| stage | " + " | ".join(keys) + " | n per task |", "|---" * (len(keys) + 2) + "|"]
    for stage, m in stages.items():
        cells = []
        for key in keys:
            if key not in m:
                cells.append("")
                continue
            task = task_of(key)
            flag = "!" if task and m.get(f"{task}_overlap", 0) > OVERLAP_FLAG else ""
            cells.append(f"{m[key]:.3f} ±{(m[key + '_hi'] - m[key + '_lo']) / 2:.3f}{flag}")
        sizes = sorted({m[k] for k in m if k.endswith("_acc_n")})
        n = "/".join(map(str, sizes)) + ("*" if m["partial"] else "")
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {n} |")
        for key, refs in references_for(m["n_layer"], stage).items():
            for value, who, source in refs:
                lines.append(f"| {who} | " + " | ".join(f"{value:.3f}" if k == key else "" for k in keys) +
                             f" | {source} |")
    notes = ["", "Cells: score ± half the 95% interval; * = PARTIAL (--limit); ! = more than 1% of the items share a "
             "13-token stretch with the training data."]
    endpoints = {m["hf_endpoint"] for m in stages.values()}
    if endpoints != {data.DEFAULT_HF_ENDPOINT}:
        notes.append(f"Exam files served by {', '.join(sorted(endpoints))}, not the Hugging Face Hub: not benchmark scores.")
    return lines + notes


# ====================================================================================================
# Fixtures: a stand-in Hub for tests and rehearsals
# ====================================================================================================

def fixture_rows(name, n, rng):
    """n templated rows in the real schema of a task's file (the content is simple; the columns, types and
    nesting are those of the real file)."""
    rows = []
    for i in range(n):  # two-digit answers: no choice is a prefix of another (a prefix is as likely as the whole)
        a, b = rng.randint(5, 45), rng.randint(5, 45)
        wrong = rng.sample([v for v in range(10, 100) if v != a + b], 3)
        options = [a + b] + wrong
        rng.shuffle(options)
        gold = options.index(a + b)
        if name == "hellaswag":
            ctx_a, ctx_b = f"A cook puts {a} eggs in a bowl and then {b} more.", "then"
            endings = [f"counts {v} eggs in the bowl." for v in options]
            rows.append({"ind": i, "activity_label": "Cooking", "ctx_a": ctx_a, "ctx_b": ctx_b,
                         "ctx": f"{ctx_a} {ctx_b.capitalize()}", "endings": endings, "source_id": f"fixture-{i}",
                         "split": "val", "split_type": "indomain", "label": str(gold)})
        elif name in ("arc_easy", "arc_challenge"):
            labels = list("ABCD")
            rows.append({"id": f"Fixture_{name}_{i}", "question": f"A jar holds {a} marbles and {b} are added. How many are in the jar?",
                         "choices": {"text": [str(v) for v in options], "label": labels}, "answerKey": labels[gold]})
        elif name == "mmlu":
            rows.append({"question": f"What is the sum of {a} and {b}?", "subject": "elementary_mathematics",
                         "choices": [str(v) for v in options], "answer": gold})
        else:
            rows.append({"question": f"A farmer picks {a} melons on Monday and {b} melons on Tuesday. "
                                     "How many melons does the farmer pick in the two days?",
                         "answer": f"The farmer picks {a} + {b} = <<{a}+{b}={a + b}>>{a + b} melons.\n#### {a + b}"})
    return rows


def write_eval_fixtures(root, n=40, seed=0):
    """Write every task's file, n rows each, as <root>/datasets/<org>/<name>/resolve/main/<path>: a plain
    `python -m http.server` on root then answers data.hf_url's requests (HF_ENDPOINT=http://host:port).
    Returns the paths written."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng, paths = random.Random(seed), []
    for name, task in TASKS.items():
        path = os.path.join(root, "datasets", task.repo, "resolve", "main", task.path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with data.atomic_path(path) as tmp:
            pq.write_table(pa.Table.from_pylist(fixture_rows(name, n, rng)), tmp)
        paths.append(path)
    return paths


# ====================================================================================================
# The command line
# ====================================================================================================

@dataclass
class EvalConfig:
    """What to examine, on what, and how."""
    checkpoint: str = opt(os.path.join("out", "base"), "the model: a checkpoint file or stage folder")
    tasks: tuple = opt((), f"tasks to run (default: {', '.join(BASE_TASKS)} for a base model; "
                           f"{', '.join(CHAT_TASKS)} for a chat model)")
    out_dir: str = opt("", "where metrics.json and results.txt go (default: <checkpoint's folder>/../evals/<stage>)")
    data_dir: str = opt(os.path.join("out", "evals", "data"), "where the test splits are downloaded to, once")
    limit: int = opt(0, "examine a seeded sample of at most N items per task (0 = all); marks the run PARTIAL")
    shots: int = opt(0, "base-model tasks: solved examples of the same set shown before each item (few-shot)")
    chat: str = opt("auto", "auto (by the checkpoint's stage), yes (letters / generation), no (log-likelihood)")
    batch_size: int = opt(32, "sequences per forward pass (GSM8K: prompts decoded together)")
    max_tokens: int = opt(256, "GSM8K: longest reply, in tokens")
    contamination: bool = opt(True, "check the exam items against the training data")
    train_shards: tuple = opt((os.path.join("out", "shards", "embedded", "embedded_train_*.bin"),),
                              "globs of the pretraining token shards the model read")
    train_texts: tuple = opt((), "post-training files the model read (.jsonl of conversations, documents or "
                                 "problems; .txt; .parquet)")
    generated: int = opt(500, "examples of each of data.py's SFT generators (and RL problems) to check against")
    ngram: int = opt(13, "contamination: tokens in a shared window")
    device: str = opt("auto", "cuda, mps, cpu, or auto")
    dtype: str = opt("auto", "autocast dtype: auto (bfloat16 on CUDA), float32, bfloat16")
    seed: int = opt(1337, "seed of the --limit sample, the few-shot examples and the generated training data")


def check_config(cfg):
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise UserError(f"--tasks: unknown {', '.join(unknown)} (choose from {', '.join(TASKS)})")
    if cfg.chat not in ("auto", "yes", "no"):
        raise UserError(f"--chat must be auto, yes or no, got {cfg.chat!r}")
    for name in ("limit", "shots"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be 0 or more, got {getattr(cfg, name)}")
    for name in ("batch_size", "max_tokens", "ngram"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")


def run(cfg, log=print):
    """Examine cfg.checkpoint -> the flat metrics (also written to out_dir/metrics.json by rank 0)."""
    check_config(cfg)
    if cfg.contamination:
        training_shards(cfg)  # before hours of exams, not after
    started = time.time()
    rt = setup_runtime(cfg.device, cfg.dtype)
    log = log if rt.master else (lambda *a, **k: None)
    model, tok, meta = load_checkpoint(cfg.checkpoint, device=rt.device)
    model.eval()
    stage = meta.get("stage", "base")
    chat = stage != "base" if cfg.chat == "auto" else cfg.chat == "yes"
    tasks = cfg.tasks or (CHAT_TASKS if chat else BASE_TASKS)
    if not chat and "gsm8k" in tasks:
        raise UserError("--tasks gsm8k needs a chat model (GSM8K is answered in a reply); use --chat yes to insist")
    if rt.master:  # one process downloads; under torchrun the others wait, then read the same files
        for name in tasks:
            data_file(name, cfg.data_dir)
    if rt.world > 1:
        dist.barrier()
    exams = {}
    for name in tasks:
        items = load_items(name, cfg.data_dir)
        exams[name] = (items, sample_items(items, cfg.limit, cfg.seed))
    log(f"examining {cfg.checkpoint} (stage {stage}, {'chat' if chat else 'base'} tasks) on "
        + ", ".join(f"{name} {len(ix)}/{len(items)}" for name, (items, ix) in exams.items())
        + (f"; {cfg.shots}-shot" if cfg.shots and not chat else ""))
    metrics = {"stage": stage, "checkpoint": cfg.checkpoint, "n_layer": model.config.n_layer,
               "params": model.num_params(), "partial": bool(cfg.limit) and any(
                   len(ix) < len(items) for items, ix in exams.values()),
               "limit": cfg.limit, "shots": cfg.shots if not chat else 0, "seed": cfg.seed,
               "hf_endpoint": hf_endpoint()}
    for name, (items, indices) in exams.items():
        t0 = time.time()
        metrics.update(evaluate_task(model, tok, rt, name, items, indices, chat, cfg))
        metrics[f"{name}_of"] = len(items)
        log(f"{name}: {metrics[HEADLINE[name]]:.3f} on {len(indices)} items ({time.time() - t0:.1f}s)")
    scored = [(metrics[HEADLINE[t]], metrics[HEADLINE[t] + "_baseline"], metrics[HEADLINE[t] + "_n"]) for t in exams]
    mean, lo, hi = centred_mean(scored)
    key = "chatcore" if chat else "core"
    metrics.update({key: mean, f"{key}_lo": lo, f"{key}_hi": hi, f"{key}_tasks": len(scored)})
    if cfg.contamination and rt.master:
        for name, seen in contamination(tok, exams, cfg, log).items():
            metrics[f"{name}_overlap"] = seen / len(exams[name][1])
            metrics[f"{name}_overlap_items"] = seen
    metrics["eval_seconds"] = time.time() - started
    if rt.master:
        out_dir = cfg.out_dir or os.path.join(os.path.dirname(os.path.abspath(
            cfg.checkpoint if os.path.isdir(cfg.checkpoint) else os.path.dirname(cfg.checkpoint))), "evals", stage)
        lines = result_lines(metrics)
        print("\n".join(lines))
        os.makedirs(out_dir, exist_ok=True)
        write_json(os.path.join(out_dir, "metrics.json"), metrics)
        with data.atomic_path(os.path.join(out_dir, "results.txt")) as tmp, open(tmp, "w") as f:
            f.write(f"python evals.py {' '.join(sys.argv[1:])}\nconfig: {json.dumps(asdict(cfg))}\n\n"
                    + "\n".join(lines) + "\n")
        evals_dir = os.path.dirname(os.path.abspath(out_dir))
        if os.path.basename(evals_dir) == "evals":  # the agreed layout: refresh the table of every stage so far
            with data.atomic_path(os.path.join(evals_dir, TABLE_FILE)) as tmp, open(tmp, "w") as f:
                f.write("\n".join(report_table(os.path.dirname(evals_dir))) + "\n")
        log(f"-> {os.path.join(out_dir, 'metrics.json')} ({time.time() - started:.1f}s)")
    return metrics


def main(argv):
    if argv[:1] == ["write-fixtures"]:
        if len(argv) not in (2, 3) or not all(a.isdigit() for a in argv[2:]):
            raise UserError("usage: python evals.py write-fixtures DIR [ROWS per task, default 40]")
        for path in write_eval_fixtures(argv[1], *map(int, argv[2:])):
            print(path)
        return
    cfg = parse_config(EvalConfig, argv, prog="evals.py", description=__doc__)
    with distributed_stage():  # under torchrun, rank 1 must not exit while rank 0 still writes the results
        run(cfg)


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `python evals.py write-fixtures DIR | head` ends quietly
    run_cli(main)
