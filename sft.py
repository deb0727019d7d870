"""
sft.py -- supervised finetuning: from a document simulator to an assistant.

The lecture's textbook analogy: pretraining is reading the exposition, SFT is studying *worked problems*
(an expert's solution, shown step by step), RL is doing practice problems. A base model only continues
documents. To turn it into an assistant we keep exactly the same training algorithm -- next-token
prediction, the same model, the same optimizer -- and swap the dataset: documents out, conversations in.
The conversations are written by labelers following labeling instructions (LABELING.md: helpful, truthful,
harmless), so after finetuning the model is a *statistical simulation of a labeler*: asked a question, it
produces what a labeler following those instructions would most likely have written.

Two details make it work:
  * the protocol: every conversation becomes one token sequence,
        <|im_start|>user<|im_sep|>What is 2+2?<|im_end|><|im_start|>assistant<|im_sep|>2+2 = 4<|im_end|>
    and at chat time the model is handed the sequence up to `<|im_start|>assistant<|im_sep|>` and writes on;
  * the loss mask: the model is trained to produce the assistant's tokens only (its words, its tool calls,
    its closing <|im_end|>), never the user's words or what a tool answered. It learns to *respond*.

The data (generators in data.py, mixed here) teaches, by example: the lecture's conversations; who the
model is ("knowledge of self"); step-by-step word problems ("models need tokens to think"); the code tool
for big numbers and for counting letters (tokens hide characters); the search tool; and *refusals where
the model does not know*: each knowledge question is first put to the base model several times
("model interrogation", Llama 3), and where its answers miss the reference, the training answer becomes
"I'm sorry, I don't believe I know." -- the model learns to tie its uncertainty to that sentence.

Post-training is cheap next to pretraining: for production models about 3 hours against about 3 months on
thousands of GPUs; here a couple of minutes on a laptop CPU.

    python sft.py                          # finetune out/base -> out/sft, then evaluate (before/after)
    python sft.py --show-data              # a few rendered rows of every data source, with token counts
    python sft.py --data mine.jsonl        # add your own conversations ({"messages": [...]} per line)
    python sft.py --preset d12 --base out/d12/base --out-dir out/d12/sft --data-dir out/d12/downloads
                                           # GPU: SmolTalk + GSM8K (downloaded) + the generators
    python sft.py eval                     # evaluate out/sft against out/base on held-out prompts
    python sft.py --resume                 # continue a killed run from its last checkpoint (same flags)
"""
import json
import math
import multiprocessing
import os
import random
import re
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import data
from data import DEFAULT_DIFFICULTY
from chat import (DEFAULT_MEMORY_GB, SYSTEM_MESSAGE, Engine, Search, format_search_results, run_code,
                  tool_output_tokens)
from tokenizer import (SPECIAL_TOKENS, Tokenizer, available_cpus, check_messages, render_conversation,
                       render_for_completion, render_tokens, use_colour)
from train_gpt import PRESETS as PRETRAINING_PRESETS
from train_gpt import (StageLog, UserError, all_reduce_mean, build_optimizers, check_resume, checkpoint_file,
                       distributed_stage, fmt_time, load_checkpoint, lr_multiplier, on_every_process, opt, parse_config,
                       resume_if_asked, run_cli, save_training_state, setup_runtime, write_metrics)


@dataclass
class SFTConfig:
    """Every knob of a finetuning run. The defaults are the `tiny` preset: a few minutes on 2 CPU cores."""
    base: str = opt(os.path.join("out", "base", "model.pt"), "the pretrained checkpoint to start from")
    tokenizer: str = opt("", "insist on this tokenizer.json: the base checkpoint must have been trained with it")
    out_dir: str = opt(os.path.join("out", "sft"), "where the checkpoint, log and metrics go", path="out")
    data: tuple = opt((), "extra conversations: JSONL files of {\"messages\": [...]} per line")
    conversations: int = opt(6000, "generated training conversations (before --data)")
    # real conversations, downloaded (the GPU presets): see "Real conversations" below
    smoltalk_rows: int = opt(0, "SmolTalk conversations to add (0 = none; more than there are = all)")
    smoltalk_files: int = opt(4, "how many of SmolTalk's 4 train parquet files to read")
    gsm8k_rows: int = opt(0, "GSM8K train solutions to add, calculator notes as code-tool calls (0 = none)")
    data_dir: str = opt(os.path.join("out", "downloads"), "where downloaded datasets are kept")
    # training: the pretraining optimizer, with lower learning rates and a short schedule. Many small steps
    # rather than a few big ones: copying a 6-digit number into a code call is a skill the model forms
    # suddenly after enough updates (measured on 1 core: 220 steps x 32 conversations left tool accuracy at
    # 0.03, 440 steps x 16 -- the same examples -- reached 0.93); 380 x 16 fits the 3-minute budget.
    batch_size: int = opt(16, "conversations per optimizer step", low=1)
    bucket_rows: int = opt(8, "conversations per forward pass (of similar length; their gradients add up)", low=1)
    num_steps: int = opt(380, "optimizer steps", low=1)
    matrix_lr: float = opt(0.02, "Muon learning rate (pretraining: 0.03)")
    embed_lr: float = opt(0.15, "AdamW learning rate for the embedding (pretraining: 0.3)")
    head_lr: float = opt(0.004, "AdamW learning rate for the output head (pretraining: 0.008)")
    muon_momentum: float = opt(0.95, "Muon momentum")
    adam_beta1: float = opt(0.8, "AdamW beta1")
    adam_beta2: float = opt(0.95, "AdamW beta2")
    warmup_steps: int = opt(5, "linear learning-rate warmup")
    warmdown_frac: float = opt(0.5, "fraction of steps at the end with a linearly decaying learning rate")
    final_lr_frac: float = opt(0.0, "learning rate at the last step, as a fraction of the peak")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0 = no clipping)")
    # data building and evaluation
    interrogate_samples: int = opt(3, "answers sampled from the base model per knowledge question")
    eval_prompts: int = opt(40, "held-out prompts per evaluated skill")
    eval_tokens: int = opt(96, "most tokens of a reply during evaluation")
    eval_every: int = opt(100, "steps between held-out loss evaluations (0 = only at the end)")
    sample_every: int = opt(200, "steps between sample chats (0 = never)")
    difficulty: int = opt(DEFAULT_DIFFICULTY, "word-problem difficulty (1 = easiest)")
    show_data: bool = opt(False, "print a few rendered rows of every data source and exit")
    # --no-refusals (argparse reads any "--no-X" as X=False, hence a field named for what is kept)
    refusals: bool = opt(True, "refusal rows; --no-refusals is the lecture's cause of hallucination (H1): answer "
                               "every knowledge question confidently, no refusals (for `chat.py demo hallucination`)")
    device: str = opt("auto", "cuda, mps, cpu, or auto")
    dtype: str = opt("auto", "autocast dtype: auto (bfloat16 on CUDA), float32, bfloat16")
    memory_gb: float = opt(DEFAULT_MEMORY_GB, "most GB one sampling call's KV cache and logits may take")
    seed: int = opt(1337, "random seed for the training data and the run")
    eval_seed: int = opt(4242, "seed of the held-out evaluation prompts (different from --seed)")
    save_every: int = opt(100, "steps between checkpoints, so a killed run can --resume (0 = only at the end)", low=0)
    resume: bool = opt(False, "continue from the checkpoint in out_dir (the same flags as the run it continues)")


# Flags a resumed run may change (train_gpt.restore refuses any other difference): where the files are,
# what is watched and evaluated after training, and where it runs.
RESUME_FREE_FLAGS = ("base", "tokenizer", "out_dir", "data", "data_dir", "eval_prompts", "eval_tokens", "eval_every",
                     "sample_every", "show_data", "device", "dtype", "memory_gb", "eval_seed", "save_every", "resume")


# The GPU presets finetune on real conversations (SmolTalk, GSM8K) with the generators as a minority, at a
# fixed fraction of the pretraining preset's learning rates. SFT_LR_FRACTION is not measured at GPU scale
# yet (no GPU was at hand): 0.25 lies between nanochat's mid-training on the same data (1.0) and its final
# SFT (0.02); the tiny preset's measured 0.5 is for a far shorter run. Tune it when a GPU is at hand.
SFT_LR_FRACTION = 0.25


def _gpu_preset(depth, steps, batch, smoltalk_rows, conversations):
    pre = PRETRAINING_PRESETS[f"d{depth}"]
    return dict(conversations=conversations, smoltalk_rows=smoltalk_rows, gsm8k_rows=10**9, batch_size=batch,
                num_steps=steps, eval_every=250, sample_every=500, eval_prompts=200, eval_tokens=256,
                **{k: SFT_LR_FRACTION * pre[k] for k in ("matrix_lr", "embed_lr", "head_lr")})


# about one pass over the mixture: d12 3,000 x 64 = 192K rows (160K SmolTalk + 7.5K GSM8K + 20K generated);
# d20 (and d26) 4,000 x 128 = 512K rows (all 460K of SmolTalk + GSM8K + 40K generated)
PRESETS = {
    "tiny": {},
    "d12": _gpu_preset(12, 3000, 64, 160_000, 20_000),
    "d20": _gpu_preset(20, 4000, 128, 10**9, 40_000),
    "d26": _gpu_preset(26, 4000, 128, 10**9, 40_000),
}

# The SFT mixture: what share of the generated conversations each labeler's task gets. (Measured, issue 18,
# BENCHMARKS.md: before the model had its pointer, more counting and Emily rows at the expense of the others
# left it unable to copy words all the same. With the pointer, the every-k-th step said in words and the
# engine's guards (chat.py, "Copying"), 15% counting rows put dots, letters and every-k-th at 0.80-1.00 in
# most runs. Emily's share went from 8% to 10% (and tool arithmetic from 20% to 18%): at 8% it gave
# 0.58-0.88 across seeds and mixtures, too often under its bar of 0.70. Word problems without the tool stay
# near the low end of their bar, 0.20, at every mixture tried (0.05-0.28): the tiny model never learns the few
# hundred two-digit sums and differences their steps need, not even from drills of them.)
MIXTURE = {
    "identity": 0.04, "word_problem": 0.17, "word_problem_tool": 0.05, "arithmetic_tool": 0.18,
    "mental_arithmetic": 0.10, "counting_tool": 0.15, "emily_code": 0.10, "unknown_name": 0.02, "knowledge": 0.15,
    "search": 0.02, "lecture": 0.01, "verse": 0.01,
}


# ----------------------------------------------------------------------------------------------------
# Model interrogation (hallucination mitigation #1)

INTERROGATION_PROMPT = ("Q: Which play is Romeo in?\nA: Romeo And Juliet.\n\n"
                        "Q: Which play is Prospero in?\nA: The Tempest.\n\n"
                        "Q: Which play is {name} in?\nA:")
def interrogate(engine, tok, characters, samples, seed):
    """Ask the base model about every character `samples` times, in a document-like Q/A format it can
    continue, and judge each answer against the reference (does it name the right play?). -> {name: share
    of answers judged correct}. The base model is what we ask because it holds the knowledge: SFT only
    teaches it how to speak, not new facts."""
    prompts = [tok.encode(INTERROGATION_PROMPT.format(name=name)) for name, _, _ in characters]
    completions = engine.generate(prompts, n=samples, max_tokens=10, temperature=1.0, top_k=50, seed=seed)
    verdicts = {}
    for c in completions:
        name, _, title = characters[c.prompt_index]
        answer = tok.decode(c.tokens).split("\n")[0].lower()
        verdicts.setdefault(name, []).append(any(k in answer for k in data.title_keys(title)))
    return {name: sum(v) / len(v) for name, v in verdicts.items()}


def knows(known, name):
    """The verdict: the base model knows a character if most of its answers named the right play."""
    return known.get(name, 0) >= 0.5


def knowledge_rows(rng, n, known, characters):
    """Knowledge questions answered from the reference where the base model knows, refused where not.
    Half of them ask about characters it knows: those are few (a small model knows little), and without
    the extra weight the refusal, the majority answer, would swallow them."""
    known_characters = [c for c in characters if knows(known, c[0])]
    rows = []
    for _ in range(n):
        item = data.knowledge_item(rng, known_characters if known_characters and rng.random() < 0.5 else characters)
        answer = item["reference"] if knows(known, item["name"]) else data.REFUSAL
        rows.append({**data.conversation(item["question"], answer), "known": answer != data.REFUSAL})
    return rows


# ----------------------------------------------------------------------------------------------------
# Search-tool conversations (hallucination mitigation #2): the answer is read from the pasted snippet

def search_rows(rng, n, search, tok):
    """"Which line comes after ...?": the assistant searches for the line, and copies the next line out
    of the snippet the engine pastes in (cut exactly as the engine cuts it)."""
    rows = []
    for _ in range(n * 20):
        if len(rows) == n:
            break
        lines = rng.choice(search.passages)[1].splitlines()
        k = rng.randrange(len(lines) - 1) if len(lines) > 1 else 0
        line, following = lines[k].strip(), lines[k + 1].strip() if k + 1 < len(lines) else ""
        if len(line.split()) < 5 or len(following.split()) < 3:
            continue
        pasted = tok.decode(tool_output_tokens(tok, format_search_results(search.query(line, k=1))))
        if f"{line}\n{following}" not in pasted:
            continue  # the search did not bring the passage back whole: no honest answer to teach
        question = f'Search the documents: which line comes after "{line}"?'
        answer = (f"<|search_start|>{line}<|search_end|><|output_start|>{pasted}<|output_end|>\n"
                  f'The next line is: "{following}"')
        rows.append(data.conversation(question, answer))
    return rows


# ----------------------------------------------------------------------------------------------------
# Real conversations (the GPU presets): SmolTalk for general conversation, GSM8K for worked math
#
# A few hundred template conversations teach a model the protocol, not how to talk: at GPU scale most of
# the mixture is real. SmolTalk (smol-smoltalk, 460K conversations written for models under 1B parameters)
# covers everyday requests; GSM8K's 7,473 grade-school solutions teach worked arithmetic. Their authors
# wrote every calculation as a calculator note, "48/2 = <<48/2=24>>24": we turn each note into a call of
# our code tool, answered by exactly what the engine will paste at chat time, so the model learns to
# reach for the tool where a person reached for a calculator. The generators of data.py stay, as a
# minority (identity, refusals, tools, lectures).

SMOLTALK = ("HuggingFaceTB/smol-smoltalk", "data/train-{index:05d}-of-00004.parquet")
GSM8K = ("openai/gsm8k", "main/{split}-00000-of-00001.parquet")
GSM8K_SPLITS = {"train": "train", "heldout": "test"}
CALCULATOR_NOTE = re.compile(r"<<([^<>]*)>>")
THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # 1,200 -> 1200 (not the comma of "f(1,2)")


def broadcast_from_master(rt, fn):
    """fn() computed by the master process only, and handed to every process (the same answer everywhere,
    e.g. the interrogation's verdicts, which the mixture of every process must agree on)."""
    result = [fn() if rt.master else None]
    if rt.world > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]


def master_first(rt, fn):
    """fn() on the master process first, then on the others: the master downloads, the others then find
    the file in place (several processes writing one file would trip over each other)."""
    result = fn() if rt.master else None
    if rt.world > 1:
        dist.barrier()
    return result if rt.master else fn()


def hub_file(repo, path, data_dir):
    """A file of a Hugging Face dataset, downloaded once to data_dir/<org>/<name>/<path> (data.download:
    resumable, verified; the base URL is $HF_ENDPOINT's)."""
    return data.download(data.hf_url(repo, path), os.path.join(data_dir, repo, path))


def parquet_records(path, columns):
    """The rows of a parquet file as dicts of the given columns; a file without them is one clear error."""
    import pyarrow.parquet as pq  # only the real-data presets need it
    try:
        return pq.read_table(path, columns=list(columns)).to_pylist()
    except Exception as e:  # not parquet, or another schema
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise data.DataError(f"{path}: expected a parquet file with columns {', '.join(columns)} ({first_line})") from None


def clean_messages(messages):
    """SmolTalk's messages -> our conversation, or None when it is not one we can train on (malformed, no
    assistant turn, or text that looks like our protocol's markup)."""
    if not isinstance(messages, list):
        return None
    messages = [{"role": m.get("role"), "content": m.get("content")} for m in messages if isinstance(m, dict)]
    try:
        check_messages(messages)
    except ValueError:
        return None
    if not any(m["role"] == "assistant" for m in messages) or any("<|" in m["content"] for m in messages):
        return None
    return messages


def smoltalk_conversations(cfg, rt, log=print):
    """The first cfg.smoltalk_rows usable SmolTalk conversations (of cfg.smoltalk_files train files)."""
    rows, dropped = [], 0
    for index in range(cfg.smoltalk_files):
        path = master_first(rt, lambda: hub_file(SMOLTALK[0], SMOLTALK[1].format(index=index), cfg.data_dir))
        for record in parquet_records(path, ["messages"]):
            if len(rows) == cfg.smoltalk_rows:
                break
            messages = clean_messages(record["messages"])
            if messages is None:
                dropped += 1
            else:
                rows.append({"messages": messages, "split": "train"})
    log(f"SmolTalk: {len(rows):,} conversations ({dropped:,} unusable dropped)")
    return rows


def calculator_call(note):
    """One GSM8K calculator note ("48/2=24", "1,200*3=3,600", "10-12=-2") -> our code-tool call answered by
    what run_code returns for it, or None when the note is malformed: no "=", an expression our tool cannot
    evaluate, or a result that disagrees with the tool (a training example must never show the tool saying
    something it would not say)."""
    expression, equals, result = note.rpartition("=")
    expression, result = THOUSANDS_COMMA.sub("", expression).strip(), THOUSANDS_COMMA.sub("", result).strip()
    if not equals or not expression:
        return None
    output = run_code(expression)
    try:
        if not math.isclose(float(output), float(result), rel_tol=1e-6, abs_tol=1e-9):
            return None
    except ValueError:  # "Error: ..." from the tool, or a result that is no number
        return None
    return f"<|code_start|>{expression}<|code_end|><|output_start|>{output}<|output_end|>"


def gsm8k_solution(answer):
    """A GSM8K answer (steps with calculator notes, then "#### 72") -> (our assistant reply, notes dropped):
    the steps with tool calls for the notes, then the final line our verifier reads ("The answer is 72.").
    A malformed note is dropped (the text around it already states its result); an answer without a final
    number gives (None, 0)."""
    steps, hashes, final = answer.rpartition("####")
    final = data.extract_answer(f"{data.ANSWER_PREFIX} {final}") if hashes else None
    if final is None:
        return None, 0
    dropped = 0

    def replace(match):
        nonlocal dropped
        call = calculator_call(match.group(1))
        dropped += call is None
        return call or ""
    steps = CALCULATOR_NOTE.sub(replace, steps).strip()
    return "\n".join(filter(None, [steps, f"{data.ANSWER_PREFIX} {final}."])), dropped


def gsm8k_records(split, data_dir, rt):
    """GSM8K's rows of one split ("train", or "heldout" = its 1,319-problem test set): question, answer."""
    path = master_first(rt, lambda: hub_file(GSM8K[0], GSM8K[1].format(split=GSM8K_SPLITS[split]), data_dir))
    return parquet_records(path, ["question", "answer"])


def gsm8k_conversations(cfg, rt, log=print):
    """Up to cfg.gsm8k_rows GSM8K train problems, solved step by step with the code tool."""
    rows, dropped_notes, unusable = [], 0, 0
    for record in gsm8k_records("train", cfg.data_dir, rt)[:cfg.gsm8k_rows]:
        reply, dropped = gsm8k_solution(str(record["answer"]))
        dropped_notes += dropped
        if reply is None or not isinstance(record["question"], str):
            unusable += 1
            continue
        rows.append({"messages": [{"role": "user", "content": record["question"]},
                                  {"role": "assistant", "content": reply}], "split": "train"})
    log(f"GSM8K: {len(rows):,} solutions with code-tool calls ({dropped_notes:,} malformed calculator notes "
        f"dropped, {unusable:,} rows without a final answer)")
    return rows


def real_conversations(cfg, rt, log=print):
    """{source: rows} of the downloaded sources the config asks for (none for the tiny preset)."""
    real = {}
    if cfg.smoltalk_rows:
        real["smoltalk"] = smoltalk_conversations(cfg, rt, log)
    if cfg.gsm8k_rows:
        real["gsm8k"] = gsm8k_conversations(cfg, rt, log)
    return real


# ----------------------------------------------------------------------------------------------------
# The mixture

def generated_rows(source, rng, n, cfg):
    """n conversations of one model-free source of data.py."""
    makers = {
        "identity": lambda: data.identity_conversation(rng),
        "word_problem": lambda: data.word_problem_conversation(rng, cfg.difficulty),
        "word_problem_tool": lambda: data.word_problem_conversation(rng, cfg.difficulty, use_tool=True),
        "arithmetic_tool": lambda: data.arithmetic_conversation(rng),
        "mental_arithmetic": lambda: data.mental_arithmetic_conversation(rng, cfg.difficulty),
        "counting_tool": lambda: data.counting_conversation(rng),
        "emily_code": lambda: data.emily_code_conversation(rng),
        "unknown_name": lambda: data.unknown_name_conversation(rng),
        "lecture": lambda: data.lecture_conversation(rng),
        "verse": lambda: data.verse_conversation(rng),
    }
    return [makers[source]() for _ in range(n)]


def build_mixture(cfg, known, search, tok, split="train", seed=None, n=None):
    """{source: [conversation rows]} of one split: n conversations shared out by MIXTURE. Rows of the other
    split are drawn and thrown away, so a question's split never depends on the seed. `known`: the
    interrogation's verdicts; `search`: the index the search examples query."""
    rng = random.Random(cfg.seed if seed is None else seed)
    n = cfg.conversations if n is None else n
    characters = data.play_characters()
    mixture = {}
    for source, share in MIXTURE.items():
        if not cfg.refusals and source == "unknown_name":
            continue
        want, rows = max(1, round(n * share)), []
        for _ in range(50):  # a held-out set needs ~10 draws per row; hand-written rows are never held out
            if len(rows) >= want:
                break
            batch = (knowledge_rows(rng, want, known, characters) if source == "knowledge" else
                     search_rows(rng, want, search, tok) if source == "search" else
                     generated_rows(source, rng, want, cfg))
            rows += [r for r in batch if r["split"] == split][:want - len(rows)]
        mixture[source] = [with_system_message(r, rng) for r in rows]
    return mixture


SYSTEM_SHARE = 0.5  # of the conversations of every source open with the system message


def with_system_message(row, rng):
    """Half of the conversations of *every* source start with chat.py's system message, as every chat does.
    Were it only on the identity examples, the model would learn "a system message means: say who you are"
    and answer "What is 12345 * 6789?" with its name."""
    if rng.random() >= SYSTEM_SHARE or row["messages"][0]["role"] == "system":
        return row
    return {**row, "messages": [{"role": "system", "content": SYSTEM_MESSAGE}, *row["messages"]]}


def interrogate_base(cfg, engine, tok, log=print):
    """Interrogate the base model about every character of the plays -> {name: share judged correct}."""
    t0 = time.time()
    known = interrogate(engine, tok, data.play_characters(), cfg.interrogate_samples, cfg.seed)
    others = "get refusals" if cfg.refusals else "get confident answers all the same (--no-refusals)"
    log(f"interrogation: the base model named the right play for {sum(knows(known, k) for k in known)} of "
        f"{len(known)} characters ({cfg.interrogate_samples} samples each, {time.time() - t0:.1f}s); the "
        f"others {others}")
    return known


# ----------------------------------------------------------------------------------------------------
# Training

PARALLEL_RENDER_ROWS = 20_000  # below this, rendering in one process is quicker than starting workers


def render_rows(tok, rows, seq_len, log=print):
    """Conversations -> [(ids, mask)] for the model's context (seq_len + 1 tokens: inputs and the shifted
    targets). Longer ones are cut: the start of a conversation is still a valid lesson. A big mixture is
    rendered on every core this process may use (its share of them when torchrun started one process
    per GPU on the machine)."""
    messages = [row["messages"] for row in rows]
    workers = max(1, available_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if len(rows) < PARALLEL_RENDER_ROWS or workers == 1:
        rendered = [render_conversation(tok, m) for m in messages]
    else:  # fork: the workers inherit the tokenizer instead of unpickling a copy each
        with multiprocessing.get_context("fork").Pool(workers, _adopt_tokenizer, (tok,)) as pool:
            rendered = pool.map(_render_in_worker, messages, chunksize=max(1, len(rows) // (workers * 16)))
    cut = sum(len(ids) > seq_len + 1 for ids, _ in rendered)
    if cut:
        log(f"{cut} of {len(rows)} conversations were longer than the context ({seq_len + 1}) and were cut")
    return [(ids[:seq_len + 1], mask[:seq_len + 1]) for ids, mask in rendered]


_worker_tok = None


def _adopt_tokenizer(tok):
    global _worker_tok
    _worker_tok = tok


def _render_in_worker(messages):
    return render_conversation(_worker_tok, messages)


class ConversationSampler:
    """The training batches: batch_size conversations drawn at random (without repeats within a batch) from
    the rendered mixture, by a seeded generator whose state goes into every checkpoint, so that a resumed run
    draws exactly the batches the uninterrupted run would have drawn. Every process draws the same batch and
    trains on its share of it (train_step)."""

    def __init__(self, rows, batch_size, seed):
        self.rows, self.batch_size, self.rng = rows, min(batch_size, len(rows)), random.Random(seed)

    def next_batch(self):
        return self.rng.sample(self.rows, self.batch_size)

    def state_dict(self):
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state):
        self.rng.setstate(state["rng"])


def collate(batch, pad_id):
    """[(ids, mask)] -> x, y of shape (B, longest - 1). y is the next token where the mask says the model
    should produce it, and -1 (no loss) everywhere else: prompts, tool outputs and padding."""
    width = max(len(ids) for ids, _ in batch) - 1
    x = torch.full((len(batch), width), pad_id, dtype=torch.long)
    y = torch.full((len(batch), width), -1, dtype=torch.long)
    for row, (ids, mask) in enumerate(batch):
        ids, mask = torch.tensor(ids), torch.tensor(mask)
        x[row, :len(ids) - 1] = ids[:-1]
        y[row, :len(ids) - 1] = torch.where(mask[1:] == 1, ids[1:], -1)
    return x, y


def length_buckets(batch, rows_per_bucket):
    """[(ids, mask)] -> lists of conversations of similar length, each list padded to its own longest.
    Conversations here run from ~20 to ~250 tokens (~80 on average): padding a whole batch to its longest
    spends most of the forward pass on padding, while sorted into buckets of a few rows it wastes little.
    (Packing several conversations into one row would waste even less, but then most of them would start
    mid-row, after another conversation -- unlike at chat time, where the conversation starts the context;
    measured, packing cut the known-question answer rate from 0.79 to 0.21.)"""
    ordered = sorted(batch, key=lambda r: len(r[0]))
    return [ordered[i:i + rows_per_bucket] for i in range(0, len(ordered), rows_per_bucket)]


def masked_loss(model, x, y, rt):
    """-> (sum of cross-entropy over the trained positions, their count). Summed, not averaged, so a batch
    with nothing to learn gives 0 (not 0/0 = NaN), and the caller can average over the whole step."""
    with rt.autocast():
        _, losses = model(x, y, reduction="none")  # per position, 0 where y is -1 (see GPT.head_loss)
    return losses.sum(), (y >= 0).sum()


def train_step(model, optimizers, batch, lr_mult, cfg, rt, pad_id):
    """One optimizer step on a batch of conversations -> (mean loss per trained token, grad norm, tokens).
    A batch with no trained token at all changes nothing: there is no gradient to follow, and even a zero
    gradient would move the weights through the optimizers' momentum."""
    for opt_ in optimizers:
        for group in opt_.param_groups:
            group["lr"] = group["base_lr"] * lr_mult
    buckets = [collate(bucket, pad_id) for bucket in length_buckets(batch[rt.rank::rt.world], cfg.bucket_rows)]
    count = torch.tensor(float(sum((y >= 0).sum() for _, y in buckets)), device=rt.device)
    all_reduce_mean([count], rt)  # the mean count of trained tokens per process, known before any forward pass
    loss_total = torch.zeros((), device=rt.device)
    for x, y in buckets:  # gradients add up over the buckets: one step on the mean over all trained tokens
        loss_sum, _ = masked_loss(model, x.to(rt.device), y.to(rt.device), rt)
        (loss_sum / count.clamp(min=1)).backward()
        loss_total += loss_sum.detach()
    all_reduce_mean([loss_total], rt)
    all_reduce_mean([p.grad for p in model.parameters()], rt)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")).item()
    mean_loss = (loss_total / count.clamp(min=1)).item()
    if count > 0 and math.isfinite(mean_loss) and math.isfinite(grad_norm):
        for opt_ in optimizers:
            opt_.step()
    model.zero_grad(set_to_none=True)
    return mean_loss, grad_norm, int(count.item() * rt.world)


@torch.no_grad()
def heldout_loss(model, rendered, batch_size, rt, pad_id):
    """Mean loss per assistant token on held-out conversations: how well the model imitates the labeler on
    questions it never trained on."""
    model.eval()
    total, count = 0.0, 0
    for k in range(0, len(rendered), batch_size):
        x, y = collate(rendered[k:k + batch_size], pad_id)
        loss_sum, n = masked_loss(model, x.to(rt.device), y.to(rt.device), rt)
        total, count = total + loss_sum.item(), count + n.item()
    model.train()
    return total / max(count, 1)


SAMPLE_CHATS = ("What is your name?", "What is 2+2?", "Who is Hamlet?")


def print_samples(engine, tok, cfg):
    prompts = [render_for_completion(tok, [{"role": "user", "content": q}]) for q in SAMPLE_CHATS]
    for q, c in zip(SAMPLE_CHATS, engine.generate(prompts, max_tokens=48, temperature=0, seed=cfg.seed)):
        print(f"  user: {q}\n  assistant: {tok.decode(c.tokens)!r}")


# ----------------------------------------------------------------------------------------------------
# Evaluation on held-out prompts (a different seed, and only "heldout" questions)

def is_refusal(text):
    return "don't believe i know" in text.lower() or "i'm sorry" in text.lower()


def reply_texts(engine, tok, questions, cfg, chat=True):
    """Greedy replies. chat=True: the question in the chat protocol (what the assistant sees); False: the
    bare question as text (what a base model sees: the start of a document)."""
    if chat:
        prompts = [render_for_completion(tok, [{"role": "user", "content": q}]) for q in questions]
    else:
        prompts = [tok.encode(q + "\n") for q in questions]
    completions = engine.generate(prompts, max_tokens=cfg.eval_tokens, temperature=0, seed=cfg.eval_seed)
    return [(tok.decode(c.tokens).removesuffix("<|im_end|>"), c.finish) for c in completions]


def tool_call_correct(text, answer, copied=""):
    """A correct code call (its expression evaluates to the answer, and holds the `copied` text: the
    user's dots or word, quoted, which a call that only happens to give the same count lacks) and a final
    answer line equal to it. A number must match as a number (7.0 from the tool, "The answer is 7."); a
    string (the letters of "every third letter") comes back from the tool bare and is the answer's word
    (after "The answer is", on its line or the next)."""
    calls = [c for c in re.findall(r"<\|code_start\|>(.*?)<\|code_end\|>", text, re.S) if copied in c]
    if isinstance(answer, str):  # "The answer is srr." or "The answer is:" with the letters on the next line
        said = text.rsplit(data.ANSWER_PREFIX, 1)[1].strip(" :.\n") if data.ANSWER_PREFIX in text else None
        return any(run_code(c) == answer for c in calls) and said == answer
    return any(run_code(c) == repr(answer) for c in calls) and data.extract_answer(text) == answer


def heldout_items(make, want):
    """Up to `want` items of make() -> (question, payload) whose question is held out, without repeats."""
    items = {}
    for _ in range(want * 200):
        if len(items) == want:
            break
        question, payload = make()
        if data.split_of(question) == "heldout":
            items.setdefault(question, payload)
    return list(items.items())


def eval_sets(cfg, known):
    """The held-out prompts of each skill: [(question, judge(reply) -> bool)]."""
    rng, n = random.Random(cfg.eval_seed), cfg.eval_prompts

    def question_and(row, key=None):
        return row["messages"][-2]["content"], row.get(key)

    known_characters = [c for c in data.play_characters() if knows(known, c[0])]
    identity = heldout_items(lambda: question_and(data.identity_conversation(rng)), n)
    problems = data.practice_problems(n, cfg.eval_seed, cfg.difficulty, split="heldout")
    arithmetic = heldout_items(lambda: question_and(data.arithmetic_conversation(rng), "answer"), n)
    unknown = heldout_items(lambda: question_and(data.unknown_name_conversation(rng)), n)
    known_questions = heldout_items(lambda: (data.knowledge_item(rng, known_characters)["question"], None),
                                    n) if known_characters else []
    # The lecture's tool prompts, on wordings (and words) that training never used: copy, call, answer.
    def question_and_value(item):  # (question, code, value) -> (question, value): the code is the model's job
        return item[0], item[2]

    def question_and_copy(item):  # -> (question, (the quoted text the call must copy, value))
        question, code, value, _ = item
        return question, (code[:code.index(data.COPY_CLOSE, 1) + len(data.COPY_CLOSE)], value)

    copying = {kind: heldout_items(lambda kind=kind: question_and_copy(data.counting_item(rng, kind, "heldout")), n)
               for kind in data.COUNTING_WORDINGS}
    emily_code = heldout_items(lambda: question_and_value(data.emily_code_problem(rng, "heldout")), n)
    return {
        **{kind: [(q, lambda t, c=c, a=a: tool_call_correct(t, a, c)) for q, (c, a) in items]
           for kind, items in copying.items()},
        "emily_code": [(q, lambda t, a=a: tool_call_correct(t, float(a))) for q, a in emily_code],
        "identity": [(q, lambda t: data.IDENTITY_NAME in t.lower()) for q, _ in identity],
        "word_problem": [(p["question"], lambda t, a=p["answer"]: data.extract_answer(t) == a) for p in problems],
        "tool": [(q, lambda t, a=a: tool_call_correct(t, a)) for q, a in arithmetic],
        "refusal_unknown": [(q, is_refusal) for q, _ in unknown],
        "answer_known": [(q, lambda t: not is_refusal(t)) for q, _ in known_questions],
    }


METRIC_OF = {"dots": "dots_rate", "letter": "letter_count_rate", "every_kth": "every_kth_rate",
             "emily_code": "emily_code_rate", "identity": "identity_rate", "word_problem": "word_problem_accuracy", "tool": "tool_accuracy",
             "refusal_unknown": "refusal_unknown_rate", "answer_known": "answer_known_rate"}


def evaluate_chat(engine, tok, sets, cfg, chat=True):
    """-> (metrics, {skill: [(question, reply)]}). format_rate: replies that end with <|im_end|>."""
    metrics, replies, finished = {}, {}, []
    for skill, items in sets.items():
        answers = reply_texts(engine, tok, [q for q, _ in items], cfg, chat) if items else []
        metrics[METRIC_OF[skill]] = sum(judge(t) for (_, judge), (t, _) in zip(items, answers)) / max(len(items), 1)
        finished += [finish == "stop" for _, finish in answers]
        replies[skill] = [(q, t) for (q, _), (t, _) in zip(items, answers)]
    metrics["format_rate"] = sum(finished) / max(len(finished), 1)
    return metrics, replies


def print_before_after(before, after, base_replies, sft_replies, sets):
    """The lecture's before/after: the same held-out question to the base model (it continues a document)
    and to the SFT model (it answers as the assistant)."""
    print(f"\n{'metric (held-out prompts)':<28} {'base':>8} {'sft':>8}   n")
    for skill, name in {**METRIC_OF, "format": "format_rate"}.items():
        n = len(sets.get(skill, ())) if skill != "format" else sum(map(len, sets.values()))
        print(f"{name:<28} {before[name]:8.2f} {after[name]:8.2f}   {n}")
    print("\nthe same question, before (base: continues a document) and after (sft: answers):")
    for skill in sets:
        if sft_replies[skill]:
            q, base_text = base_replies[skill][0]
            print(f"  Q: {q}\n    base: {base_text[:100]!r}\n    sft:  {sft_replies[skill][0][1][:160]!r}")


# ----------------------------------------------------------------------------------------------------
# Loading checkpoints

CHAT_TOKENS = ("<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|code_start|>", "<|search_start|>")


def load_model(path, rt, tokenizer=None):
    """A checkpoint whose tokenizer speaks the chat protocol; `tokenizer` (a Tokenizer) must match it."""
    model, tok, meta = load_checkpoint(path, device=rt.device, tokenizer=tokenizer)
    missing = [t for t in CHAT_TOKENS if t not in tok.special_tokens]
    if missing:
        raise UserError(f"{checkpoint_file(path)}: its tokenizer lacks the chat tokens {', '.join(missing)}; "
                        f"train the base model with this project's tokenizer ({len(SPECIAL_TOKENS)} special tokens)")
    return model, tok, meta


def given_tokenizer(path):
    if not path:
        return None
    try:
        return Tokenizer.load(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load --tokenizer {path}: {e}") from None


# ----------------------------------------------------------------------------------------------------
# The mains

def show_data(cfg):
    """`--show-data`: the lecture's 2+2 conversation token by token, then a few rows of every source."""
    rt = setup_runtime("cpu")
    model, tok, _ = load_model(cfg.base, rt, given_tokenizer(cfg.tokenizer))
    two_plus_two = list(data.LECTURE_CONVERSATIONS[0][:2])
    ids, mask = render_conversation(tok, two_plus_two)
    primed = render_for_completion(tok, two_plus_two[:1])
    print("the lecture's conversation in the chat protocol (the lecture's GPT-4o tokenizer: 49 tokens, 52 with "
          "the assistant primer):")
    print(render_tokens(tok, ids, colour=use_colour()))
    print(f"token ids: {ids}\nloss mask: {mask}\ntoken count: {len(ids)} "
          f"(the prompt with the assistant primer: {len(primed)})\n")
    known = interrogate_base(cfg, Engine(model, tok), tok)
    mixture = build_mixture(cfg, known, Search(), tok, n=len(MIXTURE) * 40)
    for source, rows in mixture.items():
        print(f"== {source} ({MIXTURE[source]:.0%} of the mixture)")
        for row in rows[:2]:
            ids, _ = render_conversation(tok, row["messages"])
            print(f"{tok.decode(ids)}\n   [{len(ids)} tokens]")
    for path in cfg.data:
        rows = data.read_conversations(path)
        print(f"== {path}: {len(rows)} conversations")


def finetune(cfg):
    """Finetune the base checkpoint on the mixture; evaluate; write out/sft. -> the metrics."""
    started = time.time()
    rt = setup_runtime(cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    log = print if rt.master else (lambda *a, **k: None)
    extra = [row for path in cfg.data for row in data.read_conversations(path)]  # bad input fails first
    model, tok, base_meta = load_model(cfg.base, rt, given_tokenizer(cfg.tokenizer))
    ckpt_path = os.path.join(cfg.out_dir, "model.pt")
    if cfg.resume:  # a checkpoint that cannot be resumed is refused now, not after the mixture is built (minutes)
        on_every_process(lambda: check_resume(ckpt_path, model, cfg, rt, "sft", RESUME_FREE_FLAGS), rt)
    seq_len, pad_id = model.config.seq_len, tok.special_id("<|endoftext|>")
    engine, search = Engine(model, tok, memory_gb=cfg.memory_gb), Search()
    known = broadcast_from_master(rt, lambda: interrogate_base(cfg, engine, tok, log))
    if not cfg.refusals:  # as if every answer were known: the labeler always writes a confident answer
        known = {name: 1.0 for name in known}
    mixture = {**build_mixture(cfg, known, search, tok), **real_conversations(cfg, rt, log)}
    heldout = build_mixture(cfg, known, search, tok, "heldout", cfg.eval_seed, max(200, cfg.conversations // 20))
    rows = [r for rs in mixture.values() for r in rs] + extra
    train_rows = render_rows(tok, rows, seq_len, log)
    heldout_rows = render_rows(tok, [r for rs in heldout.values() for r in rs], seq_len, lambda *a: None)
    log(f"SFT mixture: {len(train_rows):,} conversations, {sum(len(i) for i, _ in train_rows):,} tokens "
        f"({sum(sum(m) for _, m in train_rows):,} trained on); " +
        ", ".join(f"{k} {len(v)}" for k, v in mixture.items()) + (f", --data {len(extra)}" if extra else ""))
    log(f"plan: {cfg.num_steps} steps x {cfg.batch_size} conversations = "
        f"{cfg.num_steps * cfg.batch_size / max(len(train_rows), 1):.1f} passes over the mixture; base "
        f"checkpoint {checkpoint_file(cfg.base)} (step {base_meta['step']}); device {rt.where}")
    optimizers = build_optimizers(model, cfg, rt.device.type)
    sampler = ConversationSampler(train_rows, cfg.batch_size, cfg.seed)
    # --resume: the mixture above was rebuilt from the *base* model (the interrogation asks it), exactly as
    # the killed run built it; now the weights, optimizer states and sampler move on to the checkpoint's step.
    resumed = resume_if_asked(cfg, rt, model, optimizers, sampler, "sft", RESUME_FREE_FLAGS)
    start = resumed["step"] if resumed else 0
    run_log = StageLog(cfg.out_dir, rt, start if resumed else None, started)

    def save(step, metrics=None):
        save_training_state(ckpt_path, model, tok, step, cfg, optimizers, sampler, rt, metrics, "sft")

    loop_started = time.time()
    for step in range(start, cfg.num_steps):
        if cfg.eval_every and step % cfg.eval_every == 0 and step > 0:
            loss = heldout_loss(model, heldout_rows, cfg.batch_size, rt, pad_id)
            log(f"step {step}/{cfg.num_steps} | held-out loss {loss:.4f}")
            run_log.record(dict(step=step, heldout_loss=loss))
        if cfg.sample_every and step % cfg.sample_every == 0 and step > 0 and rt.master:
            print_samples(engine, tok, cfg)
        t0 = time.time()
        mult = lr_multiplier(step, cfg.num_steps, cfg.warmup_steps, cfg.warmdown_frac, cfg.final_lr_frac)
        loss, grad_norm, tokens = train_step(model, optimizers, sampler.next_batch(), mult, cfg, rt, pad_id)
        if not math.isfinite(loss):
            raise UserError(f"loss {loss} at step {step}: training diverged (try lower learning rates)")
        dt = time.time() - t0
        eta = (time.time() - loop_started) / (step + 1 - start) * (cfg.num_steps - step - 1)
        log(f"step {step + 1}/{cfg.num_steps} | loss {loss:.4f} | lr {mult:.3f}x | grad norm {grad_norm:.3f} | "
            f"{tokens / dt:,.0f} trained tok/s | mfu - | elapsed {fmt_time(time.time() - started)} | eta {fmt_time(eta)}")
        run_log.record(dict(step=step + 1, loss=loss, lr_mult=mult, grad_norm=grad_norm, dt=dt))
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.num_steps:
            save(step + 1)
    train_seconds = time.time() - loop_started
    final_loss = heldout_loss(model, heldout_rows, cfg.batch_size, rt, pad_id)
    run_log.record(dict(step=cfg.num_steps, heldout_loss=final_loss, final=True))
    metrics = {}
    if rt.master:
        log(f"held-out loss {final_loss:.4f}; finetuning took {fmt_time(train_seconds)} "
            f"(for scale: production SFT takes ~3 hours against ~3 months of pretraining)")
        base_model, _, _ = load_model(cfg.base, rt, tok)
        metrics = run_eval(cfg, Engine(base_model, tok, memory_gb=cfg.memory_gb), engine, tok, known)
        metrics.update(heldout_loss=final_loss, train_seconds=train_seconds, conversations=len(train_rows))
    save(cfg.num_steps, metrics)
    run_log.close()
    if rt.master:
        write_sft_results(cfg.out_dir, metrics, known)
        log(f"-> {ckpt_path}, metrics.json ({fmt_time(time.time() - started)} wall)")
    return metrics


def run_eval(cfg, base_engine, sft_engine, tok, known):
    sets = eval_sets(cfg, known)
    before, base_replies = evaluate_chat(base_engine, tok, sets, cfg, chat=False)
    after, sft_replies = evaluate_chat(sft_engine, tok, sets, cfg)
    print_before_after(before, after, base_replies, sft_replies, sets)
    # The copying prompts again with the engine's copy guard off (chat.py, "Copying"): the model alone.
    alone = Engine(sft_engine.model, tok, memory_gb=sft_engine.memory_bytes / 2**30, copy_guard=False)
    unguarded, _ = evaluate_chat(alone, tok, {k: sets[k] for k in data.COUNTING_WORDINGS}, cfg)
    unguarded = {f"{METRIC_OF[k]}_unguarded": unguarded[METRIC_OF[k]] for k in data.COUNTING_WORDINGS}
    print("copy guard off (the model alone): " + ", ".join(f"{k} {v:.2f}" for k, v in unguarded.items()))
    return {**after, **unguarded, **{f"base_{k}": v for k, v in before.items()}}


def write_sft_results(out_dir, metrics, known):
    """The interrogation verdicts, then metrics.json (which also refreshes the report card)."""
    with open(os.path.join(out_dir, "interrogation.json"), "w") as f:
        json.dump(known, f, indent=1)
    write_metrics(out_dir, metrics)


@dataclass
class EvalConfig:
    checkpoint: str = opt(os.path.join("out", "sft", "model.pt"), "the finetuned checkpoint")
    base: str = opt(os.path.join("out", "base", "model.pt"), "the base checkpoint it came from (the 'before')")
    eval_prompts: int = opt(40, "held-out prompts per evaluated skill")
    eval_tokens: int = opt(96, "most tokens of a reply")
    difficulty: int = opt(DEFAULT_DIFFICULTY, "word-problem difficulty")
    eval_seed: int = opt(4242, "seed of the held-out prompts")
    device: str = opt("auto", "cuda, mps, cpu, or auto")


def eval_main(argv):
    cfg = parse_config(EvalConfig, argv, prog="sft.py eval",
                       description="Held-out before/after evaluation of a finetuned checkpoint.")
    rt = setup_runtime(cfg.device)
    model, tok, _ = load_model(cfg.checkpoint, rt)
    base_model, _, _ = load_model(cfg.base, rt, tok)  # the same tokenizer, or a clear error
    known_path = os.path.join(os.path.dirname(checkpoint_file(cfg.checkpoint)), "interrogation.json")
    if not os.path.exists(known_path):
        raise UserError(f"{known_path} is missing: it is written by `python sft.py` next to the checkpoint")
    with open(known_path) as f:
        known = json.load(f)
    metrics = run_eval(cfg, Engine(base_model, tok), Engine(model, tok), tok, known)
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))


def main(argv):
    if argv and argv[0] == "eval":
        return eval_main(argv[1:])
    cfg = parse_config(SFTConfig, argv, PRESETS, prog="sft.py", description=__doc__ + "\nsubcommands: eval (--help)")
    if cfg.show_data:
        return show_data(cfg)
    with distributed_stage():
        finetune(cfg)


if __name__ == "__main__":
    run_cli(main)
