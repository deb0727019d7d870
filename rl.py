"""
rl.py -- reinforcement learning: practice problems, many attempts, reinforce what is right.

After pretraining (reading the textbook's exposition) and SFT (studying its worked examples), the lecture's
third stage is the practice problems at the end of each chapter: the book gives only the question and the
final answer, and the student has to find a way there by themselves. We do not know which solution suits
the model best -- a person's "obvious" step may be too big a leap for its few layers, or a needless detour
-- so we let the model find out:

    for each practice problem, sample many solutions (the lecture: 15 attempts, "only 4 of them got the
    right answer"); check each final answer; make the correct ones more likely and the wrong ones less
    likely; repeat over many problems and many rounds.

The words of reinforcement learning: the *agent* is the model; the *state* is the prompt it sees; the
*action* is the response it samples; the *policy* is its sampling behaviour (the probabilities it gives to
every next token); the *reward* is whether the final answer is right (1) or wrong (0).

Here the practice problems are data.py's word problems (the lecture's "Emily buys apples and oranges"),
generated without their worked solutions, checked by an exact answer extractor ("The answer is N") --
a *verifiable* reward. A program that compares numbers cannot be flattered or fooled, so RL against it
can run for a very long time and only gets better (unlike RL against a learned reward model, see rlhf.py).
The same holds for code that must pass tests and for logic puzzles. This is how AlphaGo got past the best
human players: imitating experts (supervised learning) plateaus below them, while self-play against the
verifiable "who won?" kept climbing and found move 37, a move a human would play about once in 10,000.
DeepSeek-R1 showed the same for language models: with RL alone, responses grow longer as the model learns
to re-check its steps ("Wait, wait. Wait. That's an aha moment I can flag here."). A model this small
will not discover that, but the accuracy curve and the response-length curve written to out/rl/ are the
two plots of that paper.

Two algorithms share one loop; they differ only in how much weight each attempt gets in the update:
  --algo best  the lecture's literal recipe (rejection-sampling fine-tuning): of the N attempts keep the
               correct one that is shortest and fine-tune on it; the other attempts get weight 0.
  --algo pg    (default) policy gradient with group-relative advantages (GRPO-style): every attempt gets
               weight reward - mean reward of its group, so correct attempts are pushed up and wrong ones
               down, by how surprising they were. Optionally divided by the group's standard deviation
               (--std-norm), with a KL penalty that keeps the policy near the SFT model (--kl-coef), and with
               PPO ratio clipping when a batch is reused for several updates (--updates-per-batch > 1).
Tokens that the engine pasted in (tool outputs) get no weight: the model did not choose them.

    python rl.py                                   # tiny preset, from out/sft, a few minutes on a CPU
    python rl.py --algo best --samples 15          # the lecture's recipe
    python rl.py --resume                          # continue a killed run from its last checkpoint (same flags)
    python rl.py --preset gsm8k --checkpoint out/d12/sft --out-dir out/d12/rl --data-dir out/d12/downloads
                                                   # GSM8K (downloaded once) on a GPU-sized SFT model
"""
import os
import time
from dataclasses import dataclass

import torch

import data
from chat import DEFAULT_MEMORY_GB, Engine, assistant_content
from sft import collate, gsm8k_records
from tokenizer import render_for_completion, use_colour
from train_gpt import (StageLog, UserError, all_reduce_grads, all_reduce_mean, build_optimizers, distributed_stage,
                       fmt_time, gather_lists, load_checkpoint, lr_multiplier, only_master_prints, opt, parse_config,
                       require_positive, resume_if_asked, run_cli, save_curves, save_training_state, setup_runtime,
                       write_metrics)

# ====================================================================================================
# 1. Practice problems and the verifier
# ====================================================================================================

def gsm8k_problems(n, split, data_dir, rt):
    """The first n GSM8K problems of a split ("heldout" = its test set of 1,319), downloaded into data_dir
    once. Its solutions end with "#### 72"; we keep only the question and that final number, read by the
    same extractor as our replies."""
    problems = []
    for row in gsm8k_records(split, data_dir, rt)[:n]:
        final = str(row["answer"]).rsplit("####", 1)[-1]
        problems.append({"question": row["question"], "answer": data.extract_answer(f"{data.ANSWER_PREFIX} {final}")})
    return problems


def practice_set(cfg, n, split, rt):
    """n problems as {"question", "answer"} only: RL never sees a worked solution, only the final answer.
    The held-out split is drawn with another seed, and data.py keeps its questions out of the train split
    whatever the seeds, so held-out accuracy is measured on problems the model never practised on."""
    if cfg.task == "gsm8k":
        problems = gsm8k_problems(n, split, cfg.data_dir, rt)
    else:
        seed = cfg.seed if split == "train" else cfg.seed + 1
        problems = data.practice_problems(n, seed, cfg.difficulty, split)
    return [{"question": p["question"], "answer": p["answer"]} for p in problems]


def prompt_ids(tok, question, use_tool=False):
    """The state the agent sees: the question as a user turn, up to `<|im_start|>assistant<|im_sep|>` --
    exactly how SFT's word-problem conversations start (with data.USE_CODE appended when the model should
    calculate with the code tool, as in SFT's tool variant)."""
    return render_for_completion(tok, [{"role": "user", "content": question + (data.USE_CODE if use_tool else "")}])


def is_correct(text, answer):
    """The verifier: the number on the reply's last "The answer is ..." line must equal the key. A reply
    without that line is simply wrong -- the format is part of the task."""
    got = data.extract_answer(text)
    return got is not None and got == answer


def rewards_of(tok, completions, problems, samples):
    """1.0 for every attempt whose final answer is right, else 0.0 (attempt i answers problem i // samples).
    The reward sees only the final answer, so a right answer reached by wrong steps (a lucky guess: the answers
    here are small numbers) earns the same 1.0; only over many problems do the steps that really work stand
    out from luck."""
    return torch.tensor([float(is_correct(assistant_content(tok, c), problems[i // samples]["answer"]))
                         for i, c in enumerate(completions)])


# ====================================================================================================
# 2. How much each attempt is reinforced
# ====================================================================================================


def group_advantages(rewards, samples, std_norm=False):
    """Group-relative advantage: reward minus the mean reward of the attempts at the same problem. No value
    network is needed -- the group is the baseline. Attempts better than their siblings get a positive
    weight, worse ones a negative weight, and the weights of a group sum to zero: a problem that every
    attempt solved (or none did) teaches nothing and moves nothing. std_norm divides by the group's
    standard deviation, so a rare success on a hard problem counts as much as a rare failure on an easy one."""
    groups = rewards.view(-1, samples)
    adv = groups - groups.mean(dim=1, keepdim=True)
    if std_norm:
        adv = adv / (groups.std(dim=1, keepdim=True, unbiased=False) + 1e-6)
    return adv.reshape(-1)


def best_weights(rewards, lengths, samples):
    """The lecture's recipe: in each group keep the shortest correct attempt (weight 1), drop the rest
    (weight 0). Shortest, because among right answers the one that wastes no tokens is the one to imitate."""
    weights = torch.zeros_like(rewards)
    for g in range(len(rewards) // samples):
        correct = [i for i in range(g * samples, (g + 1) * samples) if rewards[i] > 0]
        if correct:
            weights[min(correct, key=lambda i: (lengths[i], i))] = 1.0
    return weights


def attempt_weights(cfg, rewards, lengths):
    """The one place where the two algorithms differ."""
    if cfg.algo == "best":
        return best_weights(rewards, lengths, cfg.samples)
    return group_advantages(rewards, cfg.samples, cfg.std_norm)


# ====================================================================================================
# 3. The update: raise the log-probability of every chosen token in proportion to its attempt's weight
# ====================================================================================================


def pack(tok, prompts, completions):
    """Prompt + response of each attempt as one row -> (inputs, targets) of shape (B, L), right-padded, by
    SFT's collate with a mask that is 1 on the tokens the model chose: targets[b, t] is the token chosen
    after inputs[b, :t+1], or -1 where nothing is learned -- the prompt, the padding, and the tool outputs
    that the engine forced (sampled == 0)."""
    rows = [(list(p) + list(c.tokens), [0] * len(p) + list(c.sampled)) for p, c in zip(prompts, completions)]
    return collate(rows, tok.special_id("<|endoftext|>"))


def token_logprobs(model, inputs, targets):
    """log p(target token | everything before it) at every position (0 where targets == -1)."""
    _, nll = model(inputs, targets, reduction="none")  # no whole-batch logits (see GPT.head_loss)
    return -nll


def policy_loss(logp, old_logp, ref_logp, weights, mask, clip_eps, kl_coef):
    """Summed over the chosen tokens (the caller divides by their count) -> (loss, summed KL).
    The surrogate ratio * weight has the gradient weight * d log p when the policy has not moved yet
    (ratio = 1): the plain policy gradient. Reusing a batch for more updates moves the policy away from the
    one that sampled it; clipping the ratio to [1 - eps, 1 + eps] then stops any token's probability being
    pushed further than that on stale evidence (PPO). The KL penalty uses the estimator
    exp(ref - logp) - (ref - logp) - 1, which is never negative and zero only where the two policies agree."""
    ratio = torch.exp(logp - old_logp)
    w = weights[:, None]
    surrogate = torch.minimum(ratio * w, ratio.clamp(1 - clip_eps, 1 + clip_eps) * w)
    log_ratio_ref = ref_logp - logp
    kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1
    loss = ((-surrogate + kl_coef * kl) * mask).sum()
    return loss, (kl.detach() * mask).sum()


def learn(policy, reference, optimizers, inputs, targets, weights, cfg, rt, lr_mult):
    """One batch of attempts -> updates_per_batch optimizer steps. Attempts with weight 0 are left out
    before any forward pass: they would contribute nothing. Rows go through in micro-batches whose
    gradients add up. Under torchrun each process learns from its own attempts and the gradients are
    averaged: every process divides by the mean count of learned tokens per process, so the step is the
    mean over all of them, as in one process. Returns the mean KL to the reference (SFT) policy over the
    learned tokens."""
    keep = weights != 0
    inputs, targets, weights = inputs[keep].to(rt.device), targets[keep].to(rt.device), weights[keep].to(rt.device)
    mask = (targets >= 0).float()
    n_tokens = mask.sum()
    all_reduce_mean([n_tokens], rt)
    if n_tokens.item() == 0:  # no process has anything to learn from: no step at all
        return 0.0
    chunks = [slice(i, i + cfg.micro_batch) for i in range(0, len(inputs), cfg.micro_batch)]
    with torch.no_grad(), rt.autocast():
        ref_logp = [token_logprobs(reference, inputs[c], targets[c]) for c in chunks]
    old_logp, kl_total = [None] * len(chunks), 0.0
    for group in (g for o in optimizers for g in o.param_groups):
        group["lr"] = group["base_lr"] * lr_mult
    for update in range(cfg.updates_per_batch):
        for k, c in enumerate(chunks):
            with rt.autocast():
                logp = token_logprobs(policy, inputs[c], targets[c])
            if update == 0:  # the policy has not moved yet: these are the sampling policy's log-probs
                old_logp[k] = logp.detach()
            loss, kl = policy_loss(logp, old_logp[k], ref_logp[k], weights[c], mask[c], cfg.clip_eps, cfg.kl_coef)
            (loss / n_tokens).backward()
            if update == 0:
                kl_total += kl.item()
        all_reduce_grads(policy, rt)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        for o in optimizers:
            o.step()
        policy.zero_grad(set_to_none=True)
    if rt.world > 1:
        kl_mean = torch.tensor(kl_total, device=rt.device)
        all_reduce_mean([kl_mean], rt)
        kl_total = kl_mean.item()
    return kl_total / n_tokens.item()


# ====================================================================================================
# 4. Measuring: held-out pass@1 (greedy) and pass@k
# ====================================================================================================


def sample_in_chunks(engine, prompts, n, max_rows, **sampling):
    """engine.generate over many prompts, a few at a time, so the KV cache holds at most max_rows rows."""
    per_call = max(1, max_rows // n)
    out = []
    for i in range(0, len(prompts), per_call):
        out += engine.generate(prompts[i:i + per_call], n=n, **sampling)
    return out


def heldout_scores(engine, tok, problems, cfg, rt, with_passk=True):
    """pass@1: the greedy answer (temperature 0) is right. pass@k: at least one of k sampled attempts is
    right -- what RL can turn into pass@1 by making the good attempts the likely ones. pass@k costs k times
    the samples of pass@1, so the evaluations between the first and the last leave it out (with_passk=False:
    passk is None). Under torchrun each process answers its share of the problems (rank r: r, r + world, ...)."""
    mine = problems[rt.rank::rt.world]
    prompts = [prompt_ids(tok, p["question"], cfg.use_tool) for p in mine]
    greedy = sample_in_chunks(engine, prompts, 1, cfg.eval_rows, max_tokens=cfg.max_tokens, temperature=0.0)
    pass1 = gather_lists(rewards_of(tok, greedy, mine, 1).tolist(), rt)
    passk = None
    if with_passk:
        sampled = sample_in_chunks(engine, prompts, cfg.pass_k, cfg.eval_rows, max_tokens=cfg.max_tokens,
                                   temperature=cfg.temperature, top_k=cfg.top_k or None, seed=cfg.seed + rt.rank)
        hits = gather_lists(rewards_of(tok, sampled, mine, cfg.pass_k).view(-1, cfg.pass_k).amax(dim=1).tolist(), rt)
        passk = torch.tensor(hits).mean().item()
    lengths = gather_lists([len(c.tokens) for c in greedy], rt)
    return dict(pass1=torch.tensor(pass1).mean().item(), passk=passk, length=sum(lengths) / len(lengths),
                example=assistant_content(tok, greedy[0]))


# ====================================================================================================
# 5. What a person sees
# ====================================================================================================

GREEN, RED, RESET = "\x1b[32m", "\x1b[31m", "\x1b[0m"


def one_line(text, width=110):
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def show_attempts(tok, problem, completions, rewards, weights, algo, colour):
    """The N attempts at one problem, marked right/wrong (green/red on a terminal), each with the weight it
    gets in the update; for --algo best, the one kept."""
    print(f"  problem: {one_line(problem['question'])}  [answer {problem['answer']}]")
    print(f"  {int(rewards.sum())} of {len(rewards)} attempts got the right answer:")
    for c, r, w in zip(completions, rewards.tolist(), weights.tolist()):
        tag = ("kept" if w > 0 else "") if algo == "best" else f"{w:+.2f}"
        text = one_line(assistant_content(tok, c))
        line = f"    {'right' if r else 'wrong'} {tag:>5} ({len(c.tokens):3d} tok) {text}"
        print(f"{GREEN if r else RED}{line}{RESET}" if colour else line)


def describe_terms(cfg):
    """Which parts of the objective are on, in words."""
    if cfg.algo == "best":
        core = f"best-of-{cfg.samples}: fine-tune on the shortest correct attempt of each problem"
    else:
        norm = "/ group std" if cfg.std_norm else "(no std normalisation)"
        core = f"policy gradient: advantage = reward - group mean {norm}, {cfg.samples} attempts per problem"
    kl = f"on, coef {cfg.kl_coef}" if cfg.kl_coef else "off (KL is still measured)"
    clip = (f"on, eps {cfg.clip_eps}, {cfg.updates_per_batch} updates per batch" if cfg.updates_per_batch > 1
            else "off (1 update per batch: the ratio is always 1)")
    return f"algo {cfg.algo} -- {core}; KL penalty to SFT: {kl}; ratio clipping: {clip}"


def write_curves(out_dir, history, evals):
    """The DeepSeek-R1 plots: accuracy and response length over RL steps (as text, and as numbers for the
    report card's PNG)."""
    series = {"training reward (fraction of attempts correct)": [(h["step"], h["reward"]) for h in history],
              "mean response length (tokens)": [(h["step"], h["length"]) for h in history],
              "held-out greedy pass@1": [(e["step"], e["pass1"]) for e in evals]}
    return save_curves(out_dir, "curves", "RL on practice problems", series)


# ====================================================================================================
# 6. The loop
# ====================================================================================================


@dataclass
class RLConfig:
    """Every knob of an RL run. The defaults are the `tiny` preset: a few minutes on 2 CPU cores."""
    checkpoint: str = opt(os.path.join("out", "sft"), "the policy to start from: an SFT checkpoint (file or folder)")
    out_dir: str = opt(os.path.join("out", "rl"), "where the checkpoint, log, curves and metrics go", path="out")
    # the practice problems
    task: str = opt("words", "words (data.py's word problems) or gsm8k (downloaded; for GPU-sized models)")
    data_dir: str = opt(os.path.join("out", "downloads"), "where downloaded datasets (GSM8K) are kept")
    # Practice where SFT left the most to learn: the problems of SFT's worked examples (difficulty 1) the SFT
    # model already solves 60-80% of with the tool, so 30 steps there gained 3-10 points; one level up (numbers
    # to 7, more digits to copy) it starts at ~0.25. Measured from one SFT model, 30 steps, 1 thread, 200
    # held-out problems each: difficulty 1 took its own held-out 0.625 -> 0.720 (difficulty 2's: 0.255 ->
    # 0.400); difficulty 2 took its own 0.255 -> 0.550 (difficulty 1's: 0.625 -> 0.645); difficulty 3 0.060 -> 0.375.
    # An SFT model from a base of 400 steps x 4,096 tokens (session 14) starts surer, so practice moved up: at
    # difficulty 2 it went 0.445 -> 0.540 and 0.450 -> 0.540 (seeds 1337, 1338), at 3 0.270 -> 0.435 and
    # 0.255 -> 0.435 (BENCHMARKS.md, "Quality per second", session 14).
    difficulty: int = opt(3, "word-problem difficulty (bigger numbers as it grows; SFT's examples are 1)")
    # With the tool the model's misses are slips in copying numbers (into a call, out of its output): one
    # skill shared by every problem, which practice improves on held-out problems too. Without it most misses
    # are wrong sums done in the head, a separate fact each. Measured on 1 core from two SFT models of a
    # near-identical recipe: 40 steps without the tool moved held-out pass@1 0.155 -> 0.165; 30 steps with
    # it, 0.52 -> 0.645.
    use_tool: bool = opt(True, "ask for the code tool in every question (its outputs are never trained on); "
                               "--no-use-tool: sums in the head")
    # the algorithm
    algo: str = opt("pg", "pg: policy gradient with group-relative advantages; best: fine-tune on the shortest "
                          "correct attempt")
    num_steps: int = opt(30, "RL steps (one batch of problems each)")
    problems_per_step: int = opt(16, "practice problems per step")
    samples: int = opt(8, "attempts sampled per problem (the lecture's example: 15)")
    max_tokens: int = opt(96, "longest response sampled, in tokens")
    # A little below 1 more attempts reach the answer (at 1.0 about a fifth do, against 0.42 greedy) while most
    # groups still disagree, so more of each batch is a right attempt to reinforce. Measured from one SFT
    # model, 35 steps, 300 held-out problems, 1 core: temperature 1.0 took pass@1 0.420 -> 0.593 by step 25,
    # 0.8 took it to 0.660 and 0.7 to 0.657 (0.8 + --std-norm: 0.653).
    temperature: float = opt(0.8, "sampling temperature of the attempts and of pass@k (1.0 = the policy itself)")
    top_k: int = opt(0, "sample only from the k likeliest tokens (0 = all)")
    std_norm: bool = opt(False, "divide advantages by their group's standard deviation")
    kl_coef: float = opt(0.0, "weight of the KL penalty to the SFT policy (0 = off)")
    clip_eps: float = opt(0.2, "PPO ratio clipping range (acts only when --updates-per-batch > 1)")
    updates_per_batch: int = opt(1, "optimizer steps on each batch of attempts")
    # the optimizer (train_gpt.py's Muon + AdamW), gentler than pretraining: small steps on a trained model
    # (1.5x these rates drove the KL to the SFT policy from 0.15 to 5.1 within 25 steps and lost the gain)
    matrix_lr: float = opt(0.002, "Muon learning rate for the matrices inside the blocks (SFT: 0.02)")
    embed_lr: float = opt(0.005, "AdamW learning rate for the token embedding (SFT: 0.15)")
    head_lr: float = opt(0.0003, "AdamW learning rate for the output head (SFT: 0.004)")
    muon_momentum: float = opt(0.9, "Muon momentum")
    adam_beta1: float = opt(0.8, "AdamW beta1")
    adam_beta2: float = opt(0.95, "AdamW beta2")
    warmdown_frac: float = opt(0.0, "fraction of steps at the end with a linearly decaying learning rate")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0 = no clipping)")
    micro_batch: int = opt(32, "attempts per forward/backward pass")
    # watching it learn
    eval_every: int = opt(20, "steps between held-out evaluations (0 = only before and after)")
    eval_problems: int = opt(200, "held-out problems per evaluation")
    pass_k: int = opt(8, "k of pass@k: attempts per held-out problem")
    eval_rows: int = opt(256, "most attempts decoded at once when evaluating (KV-cache memory)")
    show_every: int = opt(5, "steps between printing all attempts at one problem (0 = never)")
    # where and how
    device: str = opt("auto", "cuda, mps, cpu, or auto")
    dtype: str = opt("auto", "autocast dtype for learning: auto (bfloat16 on CUDA), float32, bfloat16")
    memory_gb: float = opt(DEFAULT_MEMORY_GB, "most GB one sampling call's KV cache and logits may take")
    seed: int = opt(1337, "random seed: problems, attempts and evaluations are the same for the same seed")
    save_every: int = opt(10, "steps between checkpoints, so a killed run can --resume (0 = only at the end)", low=0)
    resume: bool = opt(False, "continue from the checkpoint in out_dir (the same flags as the run it continues)")


# Flags a resumed run may change (train_gpt.restore refuses any other difference): where the files are, what is
# watched, and where it runs. (--eval-rows stays: the held-out attempts are sampled in calls of that many rows.)
RESUME_FREE_FLAGS = ("checkpoint", "out_dir", "data_dir", "eval_every", "show_every", "device", "dtype", "memory_gb",
                     "save_every", "resume")


PRESETS = {
    "tiny": {},
    # GSM8K on a GPU-sized SFT model (sft.py's GPU presets train on GSM8K's train solutions, so the policy
    # starts out able to solve some): longer answers, more attempts, the whole 1,319-problem test set.
    # The questions go in as they are, as SFT showed them (no " Use code."): its solutions call the tool
    # wherever their authors used a calculator. Micro-batches of 16 attempts keep a d26 training step near
    # 40 GB (rlhf.post_training_memory; 64 would need ~108 GB).
    "gsm8k": dict(task="gsm8k", use_tool=False, num_steps=500, problems_per_step=32, samples=16, max_tokens=256,
                  micro_batch=16, eval_every=50, eval_problems=1319, pass_k=16, eval_rows=1024),
}


def check_config(cfg):
    if cfg.algo not in ("pg", "best"):
        raise UserError(f"--algo must be pg or best, got {cfg.algo!r}")
    if cfg.task not in ("words", "gsm8k"):
        raise UserError(f"--task must be words or gsm8k, got {cfg.task!r}")
    require_positive(cfg, ("num_steps", "problems_per_step", "samples", "max_tokens", "updates_per_batch",
                           "micro_batch", "eval_problems", "pass_k", "eval_rows"))
    if cfg.samples < 2 and cfg.algo == "pg":
        raise UserError("--samples must be at least 2 for --algo pg: the advantage compares attempts in a group")
    if cfg.temperature <= 0:
        raise UserError(f"--temperature must be > 0 for the attempts to differ, got {cfg.temperature}")


@dataclass
class Learner:
    """Everything an RL step works with: the policy being trained, a frozen copy of where it started (the
    reference for the KL), the tokenizer, the engine that samples from the policy, and the optimizers."""
    rt: object
    policy: torch.nn.Module
    reference: torch.nn.Module
    tok: object
    engine: Engine
    optimizers: list
    stage: str


def make_learner(cfg):
    """Policy, reference, engine and optimizers from cfg.checkpoint (rlhf.py builds its learner here too)."""
    rt = setup_runtime(cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    policy, tok, meta = load_checkpoint(cfg.checkpoint, device=rt.device)
    reference, _, _ = load_checkpoint(cfg.checkpoint, device=rt.device, tokenizer=tok)
    reference.requires_grad_(False)
    return Learner(rt, policy, reference, tok, Engine(policy, tok, memory_gb=cfg.memory_gb),
                   build_optimizers(policy, cfg, rt.device.type), meta.get("stage", "?"))


class ProblemStream:
    """The practice problems in order, per_step of them for each step; a finite set (GSM8K) is gone through
    again from its start. Its position goes into every checkpoint, like a data loader's, so that a resumed
    run practises on the problems the uninterrupted run would have seen."""

    def __init__(self, problems, per_step):
        self.problems, self.per_step, self.position = problems, per_step, 0

    def next_batch(self):
        batch = [self.problems[(self.position + i) % len(self.problems)] for i in range(self.per_step)]
        self.position += self.per_step
        return batch

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def rl_step(step, problems, learner, cfg):
    """Sample N attempts at each problem, score them, weight them, learn. -> the step's log row (and this
    process's attempts, for display). Under torchrun each process takes its share of the problems (every
    attempt at a problem on the same process: the group is the baseline), and the row sums up all of them."""
    tok, rt = learner.tok, learner.rt
    problems = problems[rt.rank::rt.world]
    prompts = [prompt_ids(tok, p["question"], cfg.use_tool) for p in problems]
    t0 = time.time()
    completions = learner.engine.generate(prompts, n=cfg.samples, max_tokens=cfg.max_tokens,
                                          temperature=cfg.temperature, top_k=cfg.top_k or None,
                                          seed=cfg.seed * 100_003 + step + 7919 * rt.rank)
    t1 = time.time()
    rewards = rewards_of(tok, completions, problems, cfg.samples)
    lengths = [len(c.tokens) for c in completions]
    weights = attempt_weights(cfg, rewards, lengths)
    inputs, targets = pack(tok, [p for p in prompts for _ in range(cfg.samples)], completions)
    lr_mult = lr_multiplier(step, cfg.num_steps, 0, cfg.warmdown_frac, 0.0)
    kl = learn(learner.policy, learner.reference, learner.optimizers, inputs, targets, weights, cfg, learner.rt,
               lr_mult)
    t2 = time.time()
    all_rewards, all_lengths = torch.tensor(gather_lists(rewards.tolist(), rt)), gather_lists(lengths, rt)
    groups = all_rewards.view(-1, cfg.samples)
    no_signal = (groups.amax(dim=1) == groups.amin(dim=1)).float().mean().item()
    row = dict(step=step + 1, reward=all_rewards.mean().item(), no_signal=no_signal,
               length=sum(all_lengths) / len(all_lengths), kl=kl, kept=sum(gather_lists([int((weights != 0).sum())], rt)),
               sample_s=t1 - t0, learn_s=t2 - t1, rollout_tok_s=sum(all_lengths) / max(t1 - t0, 1e-9))
    return row, completions, all_rewards, weights


def train(cfg):
    """RL from cfg.checkpoint as cfg says -> the final metrics. Writes to cfg.out_dir: model.pt (stage "rl"),
    log.jsonl (one row per step and per evaluation), curves.txt and metrics.json."""
    started = time.time()
    check_config(cfg)
    learner = make_learner(cfg)
    tok, rt = learner.tok, learner.rt
    stream = ProblemStream(practice_set(cfg, cfg.num_steps * cfg.problems_per_step, "train", rt), cfg.problems_per_step)
    heldout = practice_set(cfg, cfg.eval_problems, "heldout", rt)
    # --resume: the policy, its optimizer states, the problem stream and the curves so far come back from the
    # checkpoint. The attempts' sampling needs no saved state: each step seeds its own generator from the
    # step number (rl_step), so step k samples the same attempts whether or not the run was interrupted.
    resumed = resume_if_asked(cfg, rt, learner.policy, learner.optimizers, stream, "rl", RESUME_FREE_FLAGS)
    start = resumed["step"] if resumed else 0
    history, evals = (resumed["history"], resumed["evals"]) if resumed else ([], [])
    rl_seconds = resumed["rl_seconds"] if resumed else 0.0
    run_log = StageLog(cfg.out_dir, rt, start if resumed else None, training_key="reward")
    ckpt_path = os.path.join(cfg.out_dir, "model.pt")
    colour = use_colour()
    print(f"policy: {cfg.checkpoint} ({learner.stage} checkpoint, {learner.policy.num_params():,} parameters), "
          f"device {learner.rt.where}")
    print(describe_terms(cfg))
    print(f"plan: {cfg.num_steps} steps x {cfg.problems_per_step} {cfg.task} problems (difficulty {cfg.difficulty}) "
          f"x {cfg.samples} attempts; held-out: {len(heldout)} problems, pass@1 greedy and pass@{cfg.pass_k}")

    def evaluate(step):
        t = time.time()
        scores = heldout_scores(learner.engine, tok, heldout, cfg, rt, with_passk=step in (0, cfg.num_steps))
        passk = "" if scores["passk"] is None else f" | pass@{cfg.pass_k} {scores['passk']:.3f}"
        print(f"step {step}/{cfg.num_steps} | held-out pass@1 {scores['pass1']:.3f}{passk} | greedy length "
              f"{scores['length']:.1f} | {time.time() - t:.1f}s")
        scores = dict(step=step, **scores)
        run_log.record(scores)
        return scores

    def save(step, metrics=None):  # what a resumed run needs to go on from `step`: its evaluation is repeated
        extra = dict(history=history, evals=[e for e in evals if e["step"] < step], rl_seconds=rl_seconds)
        save_training_state(ckpt_path, learner.policy, tok, step, cfg, learner.optimizers, stream, rt, metrics, "rl",
                            extra)

    for step in range(start, cfg.num_steps):
        if step == 0 or (cfg.eval_every and step % cfg.eval_every == 0):
            evals.append(evaluate(step))
        problems = stream.next_batch()
        row, completions, rewards, weights = rl_step(step, problems, learner, cfg)
        rl_seconds += row["sample_s"] + row["learn_s"]
        history.append(row)
        run_log.record(row)
        correct = " ".join(str(int(g.sum())) for g in rewards.view(-1, cfg.samples))
        print(f"step {row['step']}/{cfg.num_steps} | reward {row['reward']:.3f} | no-signal groups "
              f"{row['no_signal']:.2f} | length {row['length']:.1f} | KL {row['kl']:.4f} | kept {row['kept']} | "
              f"sample {row['sample_s']:.1f}s ({row['rollout_tok_s']:,.0f} tok/s) learn {row['learn_s']:.1f}s | "
              f"rl time {fmt_time(rl_seconds)} | correct of {cfg.samples}: {correct}")
        if cfg.show_every and row["step"] % cfg.show_every == 0 and rt.master:
            show_attempts(tok, problems[0], completions[:cfg.samples], rewards[:cfg.samples],
                          weights[:cfg.samples], cfg.algo, colour)
        if cfg.save_every and row["step"] % cfg.save_every == 0 and row["step"] < cfg.num_steps:
            save(row["step"])
    evals.append(evaluate(cfg.num_steps))
    run_log.close()

    before, after = evals[0], evals[-1]
    metrics = dict(pass1_before=before["pass1"], pass1_after=after["pass1"], passk_before=before["passk"],
                   passk_after=after["passk"], k=cfg.pass_k, train_seconds=rl_seconds,
                   length_before=before["length"], length_after=after["length"], algo=cfg.algo,
                   steps=cfg.num_steps, heldout_problems=len(heldout), wall_seconds=time.time() - started,
                   processes=rt.world)
    save(cfg.num_steps, metrics)
    if not rt.master:
        return metrics
    print(write_curves(cfg.out_dir, history, evals))
    write_metrics(cfg.out_dir, metrics)  # after the curves, so the report card shows them
    print(f"the same held-out problem before and after RL (greedy):\n  Q: {heldout[0]['question']}  "
          f"[answer {heldout[0]['answer']}]\n  SFT: {before['example']!r}\n  RL:  {after['example']!r}")
    print(f"held-out pass@1 {before['pass1']:.3f} -> {after['pass1']:.3f} | pass@{cfg.pass_k} "
          f"{before['passk']:.3f} -> {after['passk']:.3f} | {fmt_time(rl_seconds)} of RL "
          f"({fmt_time(metrics['wall_seconds'])} wall with evaluations) -> {cfg.out_dir}")
    return metrics


def main(argv):
    cfg = parse_config(RLConfig, argv, PRESETS, prog="rl.py", description=__doc__)
    with distributed_stage(), only_master_prints():
        train(cfg)


if __name__ == "__main__":
    run_cli(main)
