"""
rlhf.py -- reinforcement learning from human feedback: a reward model from rankings, RL against it, and
reward hacking caught in the act.

rl.py could practise for as long as it liked because a program checked every answer. Most of what we want
from an assistant has no such check: "write a line about the sea" has no answer key. The naive fix -- a
person scores every attempt -- is hopeless: 1,000 updates x 1,000 prompts x 1,000 attempts is a billion
human judgements. RLHF's trick (the lecture) is to ask people for very little and let a model stand in:

  1. for some prompts, sample K attempts (the lecture: 1,000 prompts x 5 rollouts) and let a person *order*
     them best to worst -- ordering is much easier for people than giving each a score;
  2. train a *reward model*: the same kind of network, with a head that outputs one score in [0, 1] for a
     (prompt, reply) pair, taught to agree with the orderings (the better reply of every pair should get
     the higher score: a ranking loss);
  3. run rl.py's policy gradient with the reward model as the judge: it can be asked a billion times.

The catch is that the reward model is a simulation of a person, and a lossy one. RL is an optimiser: after
a while it finds replies the reward model overrates -- inputs nobody showed it during training, on which
its score is just a guess. The lecture's example: after many updates the top joke about pelicans is "the
the the the the", scored 1.0. So RLHF is run briefly -- held near the SFT model by a KL penalty and stopped
early -- and is not "real" RL that could run forever. It improves the model a little, by the real measure.

Here the unverifiable task is one line of verse about a topic word (data.py's creative-writing prompts),
and the person is simulated: `human_score` below is a fixed, documented taste that only ever *orders*
attempts (optionally with noise, like people who disagree), never trains anything directly. Because it is
a program, we can also use it to *watch* what a real lab cannot: the true reward of the RL model next to
the proxy reward it is optimising. `python rlhf.py --hack` turns the KL penalty and early stopping off and
runs long, and prints the moment the two curves part: proxy up, truth down, samples degenerating.

    python rlhf.py                    # rankings -> reward model -> RL with a KL penalty and early stopping
    python rlhf.py --hack             # the same reward model, no KL, no stopping: reward hacking
    python rlhf.py --human-noise 0.1  # labelers who disagree with each other
"""
import collections
import dataclasses
import functools
import json
import os
import random
import re
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from chat import DEFAULT_MEMORY_GB, assistant_content
import sft
from rl import PRESETS as RL_PRESETS
from rl import (ProblemStream, RLConfig, group_advantages, learn, make_learner, one_line, pack, prompt_ids,
                sample_in_chunks)
from sft import SFTConfig
from train_gpt import PRESETS as TRAIN_PRESETS
from train_gpt import (GIB, GPT, LOSS_CHUNK_TOKENS, SAVED_BYTES_PER_TOKEN_LAYER, TrainConfig, UserError,
                       StageLog, all_reduce_grads, checkpoint_file, distributed_stage, dry_run, fmt_time, gather_lists,
                       load_checkpoint, only_master_prints, opt, parse_config, require_positive, resume_if_asked,
                       gpt_config, run_cli, sampling_bytes, save_checkpoint, save_curves, save_training_state,
                       write_metrics)

# ====================================================================================================
# 1. The simulated human
# ====================================================================================================

WORD = re.compile(r"[a-z']+")
PUNCTUATION = re.compile(r"[^\w\s']")
IDEAL_WORDS = (6, 14)  # a line of verse: not a fragment, not a paragraph


@functools.lru_cache(maxsize=None)
def known_words():
    """Every word of the embedded corpus: what counts as a real word to our reader."""
    return frozenset(WORD.findall(data.corpus_text_lower()))


def human_score(reply, topic):
    """The simulated person's taste, in [0, 1]. It is used only to *order* a prompt's attempts (and, in
    evaluations, to watch): the reward model never sees it, only the orderings it produces. Like a labeler
    with written instructions, it grades by a checklist, out of 5 points:

      2  the line is about the topic (the topic word appears),
      1  every word is a real word (found in the corpus): no invented words,
      1  it has a verse line's length (6 to 14 words),
      1  it ends like a sentence (. ! or ?),
     -1  for every use of a word beyond its second: "and ... and" is verse, but a person reading "love love
         love love" sees a broken machine, not a poem;
     -1  for every punctuation mark beyond one per word ("But,,,,,,!" is not a line either).

    Two lines with the same points are a tie: the person cannot say which is better, and the pair is not
    used (real labelers' instructions allow ties for the same reason)."""
    words = WORD.findall(reply.lower())
    if not words:
        return 0.0
    points = 2 * (topic in words or topic + "s" in words)
    points += all(w in known_words() for w in words)
    points += IDEAL_WORDS[0] <= len(words) <= IDEAL_WORDS[1]
    points += reply.rstrip().endswith((".", "!", "?"))
    points -= sum(max(0, n - 2) for n in collections.Counter(words).values())
    points -= max(0, len(PUNCTUATION.findall(reply)) - len(words))
    return max(points, 0) / 5


def human_order(replies, topic, noise, rng):
    """A person orders K attempts best to worst -> (order, the scores they went by). With noise > 0 each
    score is blurred by Gaussian noise of that size first: two people (or one on another day) do not
    always agree, and the reward model has to learn through that."""
    scores = [human_score(r, topic) + (rng.gauss(0.0, noise) if noise else 0.0) for r in replies]
    order = sorted(range(len(replies)), key=lambda i: (-scores[i], i))
    return order, scores


def print_cost(cfg, rl_queries):
    naive = 1000 * 1000 * 1000
    print(f"human effort: naive RL with a person scoring every attempt = 1,000 updates x 1,000 prompts x 1,000 "
          f"attempts = {naive:,} judgements. This run: {cfg.rank_prompts:,} orderings of {cfg.rank_k} attempts "
          f"({cfg.rank_prompts * cfg.rank_k:,} replies read), and the reward model answers the "
          f"{rl_queries:,} questions of RL instead.")


# ====================================================================================================
# 2. The reward model: the SFT network with a one-number head
# ====================================================================================================


class RewardModel(nn.Module):
    """A (prompt, reply) token sequence -> one score in [0, 1]. The body is a copy of the SFT model (it
    already reads conversations). The head is one linear map to a logit from two vectors: the one at the
    reply's last token, which has seen the whole conversation (the usual choice), and the average over the
    reply's tokens, which makes "how much of the reply is good" -- a share, like most of a reader's taste --
    easy to express for a network this small. sigmoid(logit) is the score."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(2 * backbone.config.n_embd, 1)
        # untrained, the scores differ at random (see the example), with logits of about unit size
        nn.init.normal_(self.head.weight, std=(2 * backbone.config.n_embd) ** -0.5)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids, first, last):
        """ids (B, L) right-padded; first, last (B,): where each row's reply starts and ends -> logits (B,).
        The inputs may come from the CPU: they are moved to wherever the model is."""
        device = self.head.weight.device
        ids, first, last = ids.to(device), first.to(device), last.to(device)
        hidden = self.backbone.hidden_states(ids)
        positions = torch.arange(ids.size(1), device=ids.device)[None]
        in_reply = ((positions >= first[:, None]) & (positions <= last[:, None])).to(hidden.dtype)
        mean = (hidden * in_reply[..., None]).sum(1) / in_reply.sum(1, keepdim=True)
        final = hidden[torch.arange(len(ids)), last]
        return self.head(torch.cat([final, mean], dim=-1)).squeeze(-1).float()


def reward_batch(tok, prompts, replies):
    """Prompt ids + reply ids of each attempt -> (ids (B, L) right-padded, first (B,), last (B,)). An empty
    reply counts from the prompt's last token (`<|im_sep|>`)."""
    rows = [list(p) + list(r) for p, r in zip(prompts, replies)]
    ids = torch.full((len(rows), max(map(len, rows))), tok.special_id("<|endoftext|>"), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    last = torch.tensor([len(r) - 1 for r in rows])
    return ids, torch.minimum(torch.tensor([len(p) for p in prompts]), last), last


@torch.no_grad()
def reward_scores(rm, tok, prompts, replies, batch=64):
    """The reward model's scores in [0, 1] for many attempts (a few at a time)."""
    scores = []
    for i in range(0, len(prompts), batch):
        scores.append(torch.sigmoid(rm(*reward_batch(tok, prompts[i:i + batch], replies[i:i + batch]))))
    return torch.cat(scores).cpu()


def better_pairs(human):
    """(G, K) human scores -> (G, K, K) mask: [g, i, j] is 1 where the person put attempt i above attempt j.
    All K-choose-2 pairs of an ordering count; ties (equal scores) say nothing and are left out."""
    return (human[:, :, None] > human[:, None, :]).float()


def ranking_loss(logits, human, centering=0.0):
    """The ranking (Bradley-Terry) loss over every ordered pair of each prompt's attempts: for a better i and
    a worse j, -log sigmoid(logit_i - logit_j). It is small when the better attempt scores clearly higher, and
    its gradient raises the better one's score and lowers the worse one's. logits, human: (G, K).
    Only differences of logits count, so nothing would stop all of them drifting up together until every
    score reads 1.00 and sigmoid's flat ends hide every difference; `centering` * mean(logit^2) keeps them
    around 0 (score 0.5) at no cost to the order."""
    pairs = better_pairs(human)
    margin = logits[:, :, None] - logits[:, None, :]
    return (F.softplus(-margin) * pairs).sum() / pairs.sum().clamp(min=1) + centering * logits.pow(2).mean()


def pairwise_accuracy(scores, human):
    """The share of the person's pairs on which the reward model agrees (scores the better one higher)."""
    pairs = better_pairs(human)
    agree = (scores[:, :, None] > scores[:, None, :]).float() * pairs
    return (agree.sum() / pairs.sum().clamp(min=1)).item()


def rank_temperatures(cfg):
    """The K attempts at a prompt are sampled at K temperatures spread from rank_temp_min to rank_temp_max,
    so the person sees careful and wild attempts side by side: orderings of K near-identical lines would
    teach the reward model little (labs likewise compare samples of different models and settings)."""
    step = (cfg.rank_temp_max - cfg.rank_temp_min) / (cfg.rank_k - 1)
    return [cfg.rank_temp_min + i * step for i in range(cfg.rank_k)]


def collect_rankings(engine, tok, prompts, cfg, seed, rng, rt):
    """Sample K attempts at each prompt from the starting policy and have the person order them -> a list
    of groups {question, topic, prompt (ids), replies (token lists), texts, human (scores), order}. Under
    torchrun each process samples its share of the prompts, and every process gets all the groups."""
    prompts = prompts[rt.rank::rt.world]
    ids = [prompt_ids(tok, p["question"]) for p in prompts]
    by_temperature = [sample_in_chunks(engine, ids, 1, cfg.max_rows, max_tokens=cfg.max_tokens, temperature=t,
                                       seed=seed * 1009 + i + 7919 * rt.rank) for i, t in enumerate(rank_temperatures(cfg))]
    groups = []
    for g, p in enumerate(prompts):
        attempts = [completions[g] for completions in by_temperature]
        texts = [assistant_content(tok, c) for c in attempts]
        order, human = human_order(texts, p["topic"], cfg.human_noise, rng)
        groups.append(dict(p, prompt=ids[g], replies=[c.tokens for c in attempts], texts=texts, human=human,
                           order=order))
    return gather_lists(groups, rt)


def group_tensors(rm, tok, groups):
    """Reward-model logits (G, K) and human scores (G, K) of a list of groups (one forward pass)."""
    prompts = [g["prompt"] for g in groups for _ in g["replies"]]
    human = torch.tensor([g["human"] for g in groups])
    logits = rm(*reward_batch(tok, prompts, [r for g in groups for r in g["replies"]])).view(human.shape)
    return logits, human.to(logits.device)


@torch.no_grad()
def rm_accuracy(rm, tok, groups):
    logits, human = group_tensors(rm, tok, groups)
    return pairwise_accuracy(logits, human)


def show_example(group, before, after):
    """The lecture's worked example: one prompt's attempts, the person's order, the reward model's scores."""
    print(f"  prompt: {group['question']}")
    print("  human rank (points) | RM before | RM after | attempt")
    for rank, i in enumerate(group["order"], 1):
        print(f"  {rank:10d} ({group['human'][i] * 5:4.1f}) | {before[i]:9.2f} | {after[i]:8.2f} | "
              f"{one_line(group['texts'][i], 80)}")


def train_reward_model(cfg, tok, train_groups, heldout_groups, rt):
    """Fit a reward model to the orderings -> (model, held-out pairwise accuracy). The groups of one prompt
    stay together in a batch: the loss compares attempts *at the same prompt*. It lives on the policy's
    device; under torchrun each process takes its share of every batch and the gradients are averaged."""
    backbone, _, _ = load_checkpoint(cfg.checkpoint, device=rt.device, tokenizer=tok)
    rm = RewardModel(backbone)
    example = heldout_groups[0]
    before = reward_scores(rm, tok, [example["prompt"]] * cfg.rank_k, example["replies"]).tolist()
    print(f"reward model: held-out pairwise accuracy before training {rm_accuracy(rm, tok, heldout_groups):.3f} "
          f"(chance: 0.5)")
    # The body already reads conversations; it only needs nudging (a small learning rate), the head learns
    # from scratch. A frozen body (--rm-body-lr 0) trains 3x faster and nearly as well.
    groups = [dict(params=list(rm.head.parameters()), lr=cfg.rm_lr)]
    if cfg.rm_body_lr:
        groups.append(dict(params=list(rm.backbone.parameters()), lr=cfg.rm_body_lr))
    else:
        rm.backbone.requires_grad_(False)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    order = list(range(len(train_groups)))
    rng = random.Random(cfg.seed)
    steps = cfg.rm_epochs * -(-len(order) // cfg.rm_batch)
    step, t0 = 0, time.time()
    for epoch in range(cfg.rm_epochs):
        rng.shuffle(order)
        for i in range(0, len(order), cfg.rm_batch):
            for group in optimizer.param_groups:  # linear decay to zero: settle into the fit at the end
                group["lr"] = group["base_lr"] * (1 - step / steps)
            batch = [train_groups[k] for k in order[i:i + cfg.rm_batch]][rt.rank::rt.world]
            if batch:  # a process whose share of the last batch is empty joins the average with zeros
                with rt.autocast():
                    logits, human = group_tensors(rm, tok, batch)
                loss = ranking_loss(logits, human, cfg.rm_centering)
                loss.backward()
            all_reduce_grads(rm, rt)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        print(f"reward model epoch {epoch + 1}/{cfg.rm_epochs} | ranking loss {loss.item():.4f} | held-out "
              f"pairwise accuracy {rm_accuracy(rm, tok, heldout_groups):.3f} | {time.time() - t0:.1f}s")
    after = reward_scores(rm, tok, [example["prompt"]] * cfg.rank_k, example["replies"]).tolist()
    show_example(example, before, after)
    return rm, rm_accuracy(rm, tok, heldout_groups)


# ====================================================================================================
# 3. Watching for reward hacking, without peeking at the true reward
# ====================================================================================================


def is_degenerate(text, max_share=0.3):
    """The hacking monitor: a reply is degenerate when one word makes up more than max_share of it (with at
    least 4 words), when it repeats a two-word phrase, or when it has more than two punctuation marks per
    word. Lines of verse almost never do any of these; replies that found a blind spot of the reward model
    ("the the the the") almost always do. It reads only the replies, never the simulated person, so it may
    decide when to stop."""
    words = WORD.findall(text.lower())
    if len(PUNCTUATION.findall(text)) > 2 * max(1, len(words)):
        return True
    if len(words) < 4:
        return False
    bigrams = list(zip(words, words[1:]))
    top = max(words.count(w) for w in set(words))
    return top / len(words) > max_share or len(set(bigrams)) < len(bigrams)


def distinct_bigrams(texts):
    """Diversity across replies: distinct word pairs / all word pairs (1 = no pair ever repeats)."""
    bigrams = [b for t in texts for b in zip(WORD.findall(t.lower()), WORD.findall(t.lower())[1:])]
    return len(set(bigrams)) / max(1, len(bigrams))


def evaluate(learner, rm, prompts, cfg):
    """Held-out prompts, a few samples each (same seed every time) -> proxy reward (reward model) and true
    reward (the simulated person: only watched, never trained on), degenerate share, diversity, length and
    the reply the reward model likes best. Under torchrun each process samples its share of the prompts,
    and every process computes the figures from all of them (so all agree on when to stop)."""
    tok, rt = learner.tok, learner.rt
    prompts = prompts[rt.rank::rt.world]
    ids = [prompt_ids(tok, p["question"]) for p in prompts]
    completions = sample_in_chunks(learner.engine, ids, cfg.eval_samples, cfg.max_rows, max_tokens=cfg.max_tokens,
                                   temperature=cfg.temperature, seed=cfg.seed + 7 + 7919 * rt.rank)
    proxy = reward_scores(rm, tok, [i for i in ids for _ in range(cfg.eval_samples)], [c.tokens for c in completions])
    topics = [p["topic"] for p in prompts for _ in range(cfg.eval_samples)]
    texts = gather_lists([assistant_content(tok, c) for c in completions], rt)
    topics, proxy = gather_lists(topics, rt), torch.tensor(gather_lists(proxy.tolist(), rt))
    lengths = gather_lists([len(c.tokens) for c in completions], rt)
    true = torch.tensor([human_score(t, topic) for t, topic in zip(texts, topics)])
    best = int(proxy.argmax())
    return dict(proxy=proxy.mean().item(), true=true.mean().item(),
                degenerate=sum(map(is_degenerate, texts)) / len(texts), distinct=distinct_bigrams(texts),
                length=sum(lengths) / len(lengths), top=texts[best], top_proxy=proxy[best].item(), example=texts[0])


# ====================================================================================================
# 4. RL against the reward model (rl.py's update, a different judge)
# ====================================================================================================


def rlhf_step(step, prompts, learner, rm, cfg):
    """Sample N attempts per prompt, let the reward model score them, reinforce by group-relative advantage
    (rl.py's learn, with its per-token KL penalty to the SFT policy) -> the step's log row. Under torchrun
    each process takes its share of the prompts; the row sums up all of them."""
    tok, rt = learner.tok, learner.rt
    prompts = prompts[rt.rank::rt.world]
    ids = [prompt_ids(tok, p["question"]) for p in prompts]
    repeated = [i for i in ids for _ in range(cfg.samples)]
    t0 = time.time()
    completions = learner.engine.generate(ids, n=cfg.samples, max_tokens=cfg.max_tokens,
                                          temperature=cfg.temperature, seed=cfg.seed * 100_003 + step + 7919 * rt.rank)
    proxy = reward_scores(rm, tok, repeated, [c.tokens for c in completions])
    weights = group_advantages(proxy, cfg.samples, cfg.std_norm)
    inputs, targets = pack(tok, repeated, completions)
    kl = learn(learner.policy, learner.reference, learner.optimizers, inputs, targets, weights, cfg, learner.rt, 1.0)
    texts = gather_lists([assistant_content(tok, c) for c in completions], rt)
    lengths, proxies = gather_lists([len(c.tokens) for c in completions], rt), gather_lists(proxy.tolist(), rt)
    return dict(step=step + 1, proxy=torch.tensor(proxies).mean().item(), kl=kl,
                degenerate=sum(map(is_degenerate, texts)) / len(texts), length=sum(lengths) / len(lengths),
                tokens=sum(lengths), seconds=time.time() - t0)


def stop_reason(row, cfg, start_degenerate):
    """Early stopping that never looks at the true reward: stop when the policy has drifted further from the
    SFT model than the KL budget allows (its replies are no longer the kind the reward model was trained
    on, so its scores stop meaning much), or when the monitor sees degenerate replies grow: more than
    max_degenerate above the share of the policy RLHF started from (start_degenerate, held out). A small
    model's own replies are sometimes repetitive already (a fifth of them in one pipeline run, which a
    fixed threshold of 20% stopped at the first step); what reward hacking does is make more of them so."""
    if cfg.kl_budget and row["kl"] > cfg.kl_budget:
        return f"KL to the SFT model {row['kl']:.3f} > budget {cfg.kl_budget}"
    if cfg.max_degenerate and row["degenerate"] > start_degenerate + cfg.max_degenerate:
        return (f"{row['degenerate']:.0%} of replies degenerate > {start_degenerate:.0%} at the start + "
                f"{cfg.max_degenerate:.0%}")
    return None


def print_eval(step, e):
    print(f"  eval @ step {step}: proxy (reward model) {e['proxy']:.3f} | true (simulated person) {e['true']:.3f} | "
          f"degenerate {e['degenerate']:.0%} | distinct pairs {e['distinct']:.2f} | length {e['length']:.1f}\n"
          f"    top-scoring sample ({e['top_proxy']:.2f}): {one_line(e['top'], 90)}")


def write_curves(out_dir, name, evals, title):
    """Proxy and true reward (and the degenerate share) over the evaluations: as text and, for the report
    card, as numbers; plus a table. -> the text."""
    series = {label: [(e["step"], e[key]) for e in evals] for label, key in
              (("proxy reward (reward model)", "proxy"), ("true reward (simulated person)", "true"),
               ("degenerate replies", "degenerate"))}
    table = "step  proxy  true   degenerate\n" + "\n".join(
        f"{e['step']:4d}  {e['proxy']:.3f}  {e['true']:.3f}  {e['degenerate']:.2f}" for e in evals)
    return save_curves(out_dir, name, title, series) + "\n\n" + table


def run_rl(cfg, learner, rm, heldout, prompts, run_log, resumed=None):
    """The RL loop -> (evaluations, why it stopped, tokens sampled). Evaluates every eval_every steps and at
    the end; the main run (not --hack) saves a checkpoint every save_every steps, and goes on from one when
    `resumed` (its meta) is given."""
    evals, tokens = (resumed["evals"], resumed["tokens"]) if resumed else ([], 0)
    start, t0 = resumed["step"] if resumed else 0, time.time()
    reason = resumed.get("stop_reason") if resumed else None  # a finished run that stopped early stays stopped

    last = start  # the last step done
    for step in range(start, start if reason else cfg.num_steps):
        if step == 0 or (cfg.eval_every and step % cfg.eval_every == 0):
            evals.append(dict(step=step, **evaluate(learner, rm, heldout, cfg)))
            print_eval(step, evals[-1])
            if step:
                run_log.record(dict(eval=True, **evals[-1]))
        row = rlhf_step(step, prompts.next_batch(), learner, rm, cfg)
        run_log.record(row)
        tokens += row["tokens"]
        print(f"step {row['step']}/{cfg.num_steps} | proxy reward {row['proxy']:.3f} | KL {row['kl']:.4f} | "
              f"degenerate {row['degenerate']:.0%} | length {row['length']:.1f} | {row['seconds']:.1f}s | "
              f"elapsed {fmt_time(time.time() - t0)}")
        last, reason = row["step"], stop_reason(row, cfg, evals[0]["degenerate"])
        if reason:
            break
        if cfg.save_every and not cfg.hack and last % cfg.save_every == 0 and last < cfg.num_steps:
            save_policy(cfg, learner, prompts, last, evals, tokens)
    evals.append(dict(step=last, **evaluate(learner, rm, heldout, cfg)))
    print_eval(last, evals[-1])
    run_log.record(dict(eval=True, **evals[-1]))
    if reason:
        print(f"early stop at step {last}: {reason}")
    return evals, reason, tokens


def save_policy(cfg, learner, prompts, step, evals, tokens, metrics=None, stop_reason=None):
    """The RLHF checkpoint (every process calls it): the policy and what a resumed run needs to go on from
    `step` -- optimizer states, the prompt stream, the evaluations before step's own (which it repeats), the
    tokens sampled so far, and for a run that stopped early, why (it stays stopped)."""
    extra = dict(evals=[e for e in evals if e["step"] < step], tokens=tokens, stop_reason=stop_reason)
    save_training_state(os.path.join(cfg.out_dir, "model.pt"), learner.policy, learner.tok, step, cfg,
                        learner.optimizers, prompts, learner.rt, metrics, "rlhf", extra)


def turning_point(evals):
    """The evaluation where the true reward peaked: the last moment RL was still making the model better."""
    return max(range(len(evals)), key=lambda i: evals[i]["true"])


def report_hacking(evals):
    peak = turning_point(evals)
    first, top, final = evals[0], evals[peak], evals[-1]
    print(f"turning point: the true reward peaked at step {top['step']} ({top['true']:.3f}); since then the proxy "
          f"went {top['proxy']:.3f} -> {final['proxy']:.3f} while the true reward went {top['true']:.3f} -> "
          f"{final['true']:.3f}")
    for label, e in (("SFT (step 0)", first), (f"at the peak (step {top['step']})", top),
                     (f"at the end (step {final['step']})", final)):
        print(f"  {label}: {one_line(e['example'], 90)!r} | top-scoring: {one_line(e['top'], 60)!r} "
              f"(proxy {e['top_proxy']:.2f})")
    return dict(hack_true_peak=top["true"], hack_true_final=final["true"], hack_proxy_peak=top["proxy"],
                hack_proxy_final=final["proxy"], hack_peak_step=top["step"], hack_steps=final["step"],
                hack_degenerate_final=final["degenerate"])


# ====================================================================================================
# 5. The stage
# ====================================================================================================


@dataclass
class RLHFConfig:
    """Every knob of an RLHF run. The defaults are the `tiny` preset: a few minutes on 2 CPU cores."""
    checkpoint: str = opt(os.path.join("out", "rl"), "the policy to start from (the RL stage's; any SFT-trained "
                                                    "checkpoint works) and the reward model's body")
    out_dir: str = opt(os.path.join("out", "rlhf"), "where checkpoints, logs, curves and metrics go", path="out")
    hack: bool = opt(False, "the reward-hacking demonstration: no KL penalty, no early stopping, --hack-steps steps")
    # the person and the reward model
    rank_prompts: int = opt(1000, "prompts whose attempts the (simulated) person orders (the lecture: 1,000)")
    rank_k: int = opt(5, "attempts per ordered prompt (the lecture: 5)")
    rank_temp_min: float = opt(0.5, "sampling temperature of the most careful attempt at a ranked prompt")
    rank_temp_max: float = opt(1.5, "sampling temperature of the wildest attempt at a ranked prompt")
    human_noise: float = opt(0.0, "std of the noise in the person's judgement (0 = always the same taste)")
    heldout_prompts: int = opt(40, "held-out prompts (for the reward model's accuracy and the RL evaluations)")
    # A second pass over the same 1,000 orderings: held-out accuracy 0.779 -> 0.822, for ~15 s more.
    rm_epochs: int = opt(2, "passes of the reward model over the orderings")
    rm_batch: int = opt(16, "orderings per reward-model step")
    rm_lr: float = opt(1e-3, "AdamW learning rate of the reward model's head")
    # The body at 3e-4 rather than 1e-4 (session 15, from one RL checkpoint, 1 thread): held-out accuracy 0.782
    # against 0.751 at seed 1337, 0.806 against 0.756 at seed 1338 (BENCHMARKS.md, "Quality per second").
    rm_body_lr: float = opt(3e-4, "AdamW learning rate of the reward model's body (0 = frozen: train the head only)")
    rm_centering: float = opt(0.01, "weight of the term that keeps reward-model logits near 0 (scores near 0.5)")
    # RL against it (rl.py's policy gradient)
    num_steps: int = opt(30, "RL steps (the most: early stopping may end sooner)")
    prompts_per_step: int = opt(16, "prompts per RL step")
    samples: int = opt(8, "attempts per prompt per step")
    max_tokens: int = opt(40, "longest reply sampled, in tokens")
    # A little below 1, as in rl.py: the attempts are RL's raw material, and at 1.0 more of them are garbled
    # words that teach the policy little. From one RL model, 1 core: at 1.0 (1 RM epoch) the true reward went
    # 0.341 -> 0.360 in 30 steps; at 0.8 0.375 -> 0.436, and with 2 RM epochs 0.375 -> 0.463, both
    # stopped at step 14 by the degenerate-reply monitor.
    temperature: float = opt(0.8, "sampling temperature of attempts and evaluations")
    std_norm: bool = opt(False, "divide advantages by their group's standard deviation")
    kl_coef: float = opt(0.02, "per-token KL penalty to the SFT policy (--hack sets 0)")
    kl_budget: float = opt(1.0, "stop when the KL to the SFT policy exceeds this (0 = never; --hack sets 0)")
    max_degenerate: float = opt(0.2, "stop when the share of degenerate replies grows by more than this (0 = never; "
                                          "--hack sets 0)")
    hack_steps: int = opt(40, "RL steps of the --hack run")
    hack_lr_mult: float = opt(3.0, "the --hack run's learning rates, as a multiple of the normal ones (it gets there sooner)")
    clip_eps: float = opt(0.2, "PPO ratio clipping range (acts only when --updates-per-batch > 1)")
    updates_per_batch: int = opt(1, "optimizer steps on each batch of attempts")
    matrix_lr: float = opt(0.004, "Muon learning rate for the matrices inside the blocks")
    embed_lr: float = opt(0.01, "AdamW learning rate for the token embedding")
    head_lr: float = opt(0.0006, "AdamW learning rate for the output head")
    muon_momentum: float = opt(0.9, "Muon momentum")
    adam_beta1: float = opt(0.8, "AdamW beta1")
    adam_beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0 = no clipping)")
    micro_batch: int = opt(64, "attempts per forward/backward pass")
    # watching
    eval_every: int = opt(5, "RL steps between held-out evaluations")
    eval_samples: int = opt(4, "samples per held-out prompt in an evaluation")
    max_rows: int = opt(256, "most attempts decoded at once (KV-cache memory)")
    device: str = opt("auto", "cuda, mps, cpu, or auto")
    dtype: str = opt("auto", "autocast dtype for learning: auto (bfloat16 on CUDA), float32, bfloat16")
    memory_gb: float = opt(DEFAULT_MEMORY_GB, "most GB one sampling call's KV cache and logits may take")
    seed: int = opt(1337, "random seed: rankings, attempts and evaluations are the same for the same seed")
    save_every: int = opt(10, "RL steps between checkpoints, so a killed run can --resume (0 = only at the end)",
                          low=0)
    resume: bool = opt(False, "continue from the checkpoint in out_dir, with its reward model (the same flags "
                              "as the run it continues; not for --hack)")


# Flags a resumed run may change (train_gpt.restore refuses any other difference): where the files are, what is
# watched, and where it runs. (--eval-every, --eval-samples and --max-rows stay: the curves are made of them.)
RESUME_FREE_FLAGS = ("checkpoint", "out_dir", "device", "dtype", "memory_gb", "save_every", "resume")


PRESETS = {"tiny": {}}


def check_config(cfg):
    require_positive(cfg, ("rank_prompts", "heldout_prompts", "rm_epochs", "rm_batch", "num_steps",
                           "prompts_per_step", "max_tokens", "hack_steps", "updates_per_batch", "micro_batch",
                           "eval_samples", "max_rows"))
    if cfg.rank_k < 2 or cfg.samples < 2:
        raise UserError("--rank-k and --samples must be at least 2: rankings and advantages compare attempts")
    if min(cfg.temperature, cfg.rank_temp_min) <= 0 or cfg.rank_temp_max < cfg.rank_temp_min:
        raise UserError("--temperature and --rank-temp-min must be > 0 for attempts to differ, and --rank-temp-max "
                        f"at least --rank-temp-min; got {cfg.temperature}, {cfg.rank_temp_min}, {cfg.rank_temp_max}")


# ----------------------------------------------------------------------------------------------------
# Memory in the plan: will each post-training stage fit the GPU? (estimates, printed by the dry-run)

PROMPT_TOKENS = {"sft": 64, "rl": 256, "rlhf": 32}  # assumed longest prompts: chat questions, GSM8K, verse


def training_bytes(config, models, trained, tokens, body_adam=False):
    """One training step: `models` copies of the weights held (float32), one of them `trained` (gradients,
    and optimizer state: AdamW's two moments for the embedding and head -- or for everything when
    body_adam, as the reward model's -- and Muon's momentum for the matrices), plus the activations kept
    for the backward pass of `tokens` tokens (train_gpt.SAVED_BYTES_PER_TOKEN_LAYER under bf16 autocast), and
    the logits of one chunk of the loss (train_gpt.LOSS_CHUNK_TOKENS rows: bf16 head output, float32
    soft-capped copy, its tanh and its gradient, 14 bytes per vocabulary entry)."""
    with torch.device("meta"):  # the shape only: no memory, no time
        params = GPT(config).num_params()
    ends = 2 * config.vocab_size * config.n_embd
    optimizer = 8 * params if body_adam else 8 * ends + 4 * (params - ends)
    activations = (tokens * SAVED_BYTES_PER_TOKEN_LAYER["bfloat16"] * config.n_embd * config.n_layer
                   + min(tokens, LOSS_CHUNK_TOKENS) * 14 * config.vocab_size)
    return 4 * params * models + trained * (4 * params + optimizer) + activations


def largest_call(config, prompts, n, prompt_tokens, new_tokens, memory_gb):
    """The Engine's biggest sampling call for this many prompts: as many as fit its memory budget."""
    budget, per_call = memory_gb * GIB, 1
    while per_call < prompts and sampling_bytes(config, per_call + 1, n, prompt_tokens, new_tokens, 2) <= budget:
        per_call += 1
    return sampling_bytes(config, per_call, n, prompt_tokens, new_tokens, 2)


def post_training_memory(config, sft_preset="d20", rl_preset="gsm8k", rlhf_preset="tiny"):
    """-> {stage: {"sampling": bytes, "training": bytes}}: the estimated peak GPU memory of each stage's
    largest sampling call (beside the weights it holds) and of one training step, for a model of `config`
    at the stages' presets. Sampling runs in bfloat16 (CUDA); bytes per process under torchrun."""
    sft_cfg = SFTConfig(**sft.PRESETS[sft_preset])
    rl_cfg = RLConfig(**RL_PRESETS[rl_preset])
    rlhf_cfg = RLHFConfig(**PRESETS[rlhf_preset])
    seq = config.seq_len
    held = {"sft": training_bytes(config, 2, 1, 0), "rl": training_bytes(config, 2, 1, 0),
            "rlhf": training_bytes(config, 3, 1, 0)}  # policy, reference and the reward model's body
    calls = {  # the biggest call of each: SFT's held-out evaluation, RL's pass@k, RLHF's rankings/rollouts
        "sft": largest_call(config, 5 * sft_cfg.eval_prompts, 1, PROMPT_TOKENS["sft"], sft_cfg.eval_tokens,
                            sft_cfg.memory_gb),
        "rl": largest_call(config, max(1, rl_cfg.eval_rows // rl_cfg.pass_k), rl_cfg.pass_k, PROMPT_TOKENS["rl"],
                           rl_cfg.max_tokens, rl_cfg.memory_gb),
        "rlhf": largest_call(config, max(1, rlhf_cfg.max_rows // rlhf_cfg.eval_samples), rlhf_cfg.eval_samples,
                             PROMPT_TOKENS["rlhf"], rlhf_cfg.max_tokens, rlhf_cfg.memory_gb),
    }
    rl_tokens = rl_cfg.micro_batch * min(seq, PROMPT_TOKENS["rl"] + rl_cfg.max_tokens)
    rlhf_row = PROMPT_TOKENS["rlhf"] + rlhf_cfg.max_tokens
    steps = {  # SFT: a bucket of full-context conversations; RLHF: an RL micro-batch, or a reward-model batch
        "sft": training_bytes(config, 1, 1, sft_cfg.bucket_rows * seq),
        "rl": training_bytes(config, 2, 1, rl_tokens),
        "rlhf": max(training_bytes(config, 3, 1, rlhf_cfg.micro_batch * rlhf_row),
                    training_bytes(config, 3, 1, rlhf_cfg.rm_batch * rlhf_cfg.rank_k * rlhf_row, body_adam=True)),
    }
    return {stage: {"sampling": held[stage] + calls[stage], "training": steps[stage]} for stage in calls}


def hacking_config(cfg):
    """--hack: the same run with the guard rails off, pushed harder (larger steps: the same drift in fewer
    of them, to keep the demonstration short), and not stopped."""
    m = cfg.hack_lr_mult
    return dataclasses.replace(cfg, kl_coef=0.0, kl_budget=0.0, max_degenerate=0.0, num_steps=cfg.hack_steps,
                               matrix_lr=cfg.matrix_lr * m, embed_lr=cfg.embed_lr * m, head_lr=cfg.head_lr * m)


def reward_model_for(cfg, learner, rm_path):
    """Train the reward model, or load the one the main run trained from the same SFT model: for --hack,
    and for --resume (the resumed run must go on against the very reward model it started with)."""
    tok, rt = learner.tok, learner.rt
    if (cfg.hack or cfg.resume) and os.path.exists(rm_path):
        backbone, _, meta = load_checkpoint(rm_path, device=rt.device, tokenizer=tok)
        if meta["config"]["checkpoint"] == cfg.checkpoint:
            rm = RewardModel(backbone)
            rm.head.load_state_dict(meta["reward_head"])
            print(f"reward model: {rm_path} (held-out pairwise accuracy {meta['metrics']['rm_pair_accuracy']:.3f})")
            return rm, meta["metrics"]["rm_pair_accuracy"]
    if cfg.resume:
        raise UserError(f"cannot --resume: {rm_path} is missing or was trained from another --checkpoint than "
                        f"{cfg.checkpoint} (start without --resume)")
    rng = random.Random(cfg.seed)
    t0 = time.time()
    train_groups = collect_rankings(learner.engine, tok, data.verse_prompts(cfg.rank_prompts, cfg.seed, "train"),
                                    cfg, cfg.seed, rng, rt)
    heldout_groups = collect_rankings(learner.engine, tok, data.verse_prompts(cfg.heldout_prompts, cfg.seed + 1,
                                                                              "heldout"), cfg, cfg.seed + 1, rng, rt)
    print(f"rankings: {len(train_groups)} prompts x {cfg.rank_k} attempts ordered by the simulated person "
          f"(+ {len(heldout_groups)} held out) in {time.time() - t0:.1f}s")
    rm, accuracy = train_reward_model(cfg, tok, train_groups, heldout_groups, rt)
    if rt.master:
        save_checkpoint(rm_path, rm.backbone, tok, 0, cfg, dict(rm_pair_accuracy=accuracy), stage="reward_model",
                        extra=dict(reward_head=rm.head.state_dict()))
    return rm, accuracy


def train(cfg):
    """The whole stage -> its metrics (written to cfg.out_dir/metrics.json, merged with what is there)."""
    check_config(cfg)
    started = time.time()
    if cfg.hack and cfg.resume:
        raise UserError("--hack does not --resume (a short demonstration, and it keeps no checkpoint): run it again "
                        "without --resume")
    if cfg.hack:
        cfg = hacking_config(cfg)
    learner = make_learner(cfg)
    rt = learner.rt
    print(f"policy and reward-model body: {checkpoint_file(cfg.checkpoint)} ({learner.stage} checkpoint, "
          f"{learner.policy.num_params():,} parameters)")
    print_cost(cfg, cfg.num_steps * cfg.prompts_per_step * cfg.samples)
    prompts = ProblemStream(data.verse_prompts(cfg.num_steps * cfg.prompts_per_step, cfg.seed, "train"),
                            cfg.prompts_per_step)
    # --resume: first the policy (a checkpoint that cannot be resumed is refused before anything is computed),
    # then the reward model it was trained against, from its file (reward_model_for)
    resumed = resume_if_asked(cfg, rt, learner.policy, learner.optimizers, prompts, "rlhf", RESUME_FREE_FLAGS)
    rm, accuracy = reward_model_for(cfg, learner, os.path.join(cfg.out_dir, "reward_model.pt"))
    rm.requires_grad_(False)
    heldout = data.verse_prompts(cfg.heldout_prompts, cfg.seed + 1, "heldout")
    print(f"RL against the reward model: KL penalty {cfg.kl_coef}, KL budget {cfg.kl_budget or 'off'}, "
          f"degenerate-reply stop {cfg.max_degenerate or 'off'}; {cfg.num_steps} steps x {cfg.prompts_per_step} "
          f"prompts x {cfg.samples} attempts")
    name = "hack" if cfg.hack else "rl"
    run_log = StageLog(cfg.out_dir, rt, resumed["step"] if resumed else None, training_key="tokens",
                       name=f"{name}_log.jsonl")
    t0 = time.time()
    evals, early_stop, tokens = run_rl(cfg, learner, rm, heldout, prompts, run_log, resumed)
    rl_seconds = time.time() - t0
    run_log.close()
    reason = early_stop or f"the planned {cfg.num_steps} steps"
    first, final = evals[0], evals[-1]
    metrics = dict(rm_pair_accuracy=accuracy, true_reward_sft=first["true"], proxy_reward_sft=first["proxy"],
                   true_reward_final=final["true"], proxy_reward_final=final["proxy"], stop_step=final["step"],
                   stop_reason=reason, train_seconds=time.time() - started, rl_seconds=rl_seconds,
                   orderings=cfg.rank_prompts, rollout_tokens=tokens)
    if not cfg.hack:
        save_policy(cfg, learner, prompts, final["step"], evals, tokens, metrics, early_stop)
    if not rt.master:  # one process writes
        return {}
    curves = write_curves(cfg.out_dir, f"{name}_curves", evals,
                          "reward hacking (no KL, no early stop)" if cfg.hack else "RLHF with KL and early stopping")
    print(curves)
    metrics_path = os.path.join(cfg.out_dir, "metrics.json")
    saved = {}
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            saved = json.load(f)
    if cfg.hack:
        metrics = {**saved, **report_hacking(evals), "hack_seconds": time.time() - started}
    else:
        metrics = {**saved, **metrics}
        print(f"stopped after {final['step']} steps ({reason}): true reward {first['true']:.3f} -> "
              f"{final['true']:.3f}, proxy {first['proxy']:.3f} -> {final['proxy']:.3f} | reward model held-out "
              f"pairwise accuracy {accuracy:.3f} | {fmt_time(time.time() - started)} -> {cfg.out_dir}")
    write_metrics(cfg.out_dir, metrics)
    return metrics


def plan_main(argv):
    """`python rlhf.py plan --preset d20`: the whole run's plan before it starts -- pretraining's (train_gpt.py
    --dry-run: size, tokens, shards, memory per GPU, time) and then, for each post-training stage at the
    preset's defaults, the memory of its largest sampling call and of one training step. Estimates; nothing
    is read or allocated. (It lives here because only this file sees every stage's presets.)"""
    cfg = parse_config(TrainConfig, argv, TRAIN_PRESETS, prog="rlhf.py plan", description=plan_main.__doc__)
    plan = dry_run(cfg)
    config = gpt_config(cfg, plan["vocab_size"])
    preset = argv[argv.index("--preset") + 1] if "--preset" in argv[:-1] else "tiny"
    sft_preset = preset if preset in sft.PRESETS and preset != "tiny" else "d12"  # run.sh's choice for the rest
    print(f"post-training at this size (per process, bf16; SFT preset {sft_preset}, RL gsm8k, RLHF defaults):")
    for stage, figures in post_training_memory(config, sft_preset).items():
        print(f"  {stage:<5} largest sampling call {figures['sampling'] / GIB:5.1f} GiB, one training step "
              f"{figures['training'] / GIB:5.1f} GiB "
              f"({'fits' if max(figures.values()) < 80e9 else 'does NOT fit'} an 80 GB GPU)")


# ----------------------------------------------------------------------------------------------------
# python rlhf.py demo reward-example | reward-hacking (chat.py's lecture tour runs these)

# The lecture's worked example: five jokes, the reward model's scores, the person's ranking (1 = best).
LECTURE_SCORES = (0.1, 0.8, 0.3, 0.4, 0.5)
LECTURE_ORDER = (2, 1, 3, 5, 4)


def demo_reward_example():
    """F5: one ranking-loss update on the lecture's numbers: scores move toward the person's order."""
    logits = torch.logit(torch.tensor([LECTURE_SCORES])).requires_grad_(True)
    human = -torch.tensor([LECTURE_ORDER], dtype=torch.float)  # a higher human score = a better rank
    loss = ranking_loss(logits, human)
    loss.backward()
    with torch.no_grad():
        after = torch.sigmoid(logits - 1.0 * logits.grad)[0]  # one step of plain gradient descent, lr 1
    print(f"ranking loss {loss.item():.3f}; one gradient step (lr 1.0) on the five scores:")
    print("attempt | person's rank | RM score before -> after")
    for i, (s, r, a) in enumerate(zip(LECTURE_SCORES, LECTURE_ORDER, after.tolist()), 1):
        print(f"{i:7d} | {r:13d} | {s:.2f} -> {a:.2f}")
    print("The person's best (rank 1: 0.8) goes up, rank 2 (0.1) goes up most, rank 5 (0.4) goes down "
          "(the lecture: 0.8 -> ~0.81, 0.1 -> ~0.15, 0.4 -> ~0.3-0.35)")


def demo_reward_hacking(out_dir):
    """F8: RL against the reward model for too long: the proxy reward keeps rising while the true one falls,
    and the top sample degenerates (from the `python rlhf.py --hack` run's log in out_dir)."""
    path = os.path.join(out_dir, "hack_log.jsonl")
    if not os.path.exists(path):
        raise UserError(f"this demo needs {path}: run `python rlhf.py --hack` (about 1-2 minutes) first")
    evals = [json.loads(line) for line in open(path) if '"eval": true' in line]
    for e in evals:
        print(f"step {e['step']:3d}: proxy (reward model) {e['proxy']:.3f} | true (the person) {e['true']:.3f} | "
              f"degenerate {e['degenerate']:.0%}")
    report_hacking(evals)


@dataclass
class DemoConfig:
    out_dir: str = opt(os.path.join("out", "rlhf"), "reward-hacking: the RLHF folder holding hack_log.jsonl")


def demo_main(argv):
    """`python rlhf.py demo reward-example` (the lecture's five scores, one update) or `demo reward-hacking`."""
    if not argv or argv[0] not in ("reward-example", "reward-hacking"):
        raise UserError("usage: python rlhf.py demo reward-example | reward-hacking [--out-dir DIR]")
    cfg = parse_config(DemoConfig, argv[1:], prog=f"rlhf.py demo {argv[0]}")
    return demo_reward_example() if argv[0] == "reward-example" else demo_reward_hacking(cfg.out_dir)


def main(argv):
    if argv and argv[0] == "plan":
        return plan_main(argv[1:])
    if argv and argv[0] == "demo":
        return demo_main(argv[1:])
    cfg = parse_config(RLHFConfig, argv, PRESETS, prog="rlhf.py",
                       description=__doc__ + "\nsubcommands: plan (--help), demo reward-example | reward-hacking")
    with distributed_stage(), only_master_prints():
        train(cfg)


if __name__ == "__main__":
    run_cli(main)
