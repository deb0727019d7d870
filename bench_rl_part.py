"""bench_rl(): the RL benchmark (to be folded into bench.py as `bench.py rl`).

Runs a few RL steps from an SFT checkpoint through rl.py's own step and reports where an RL step's time
goes: sampling the attempts (the engine's batched KV-cache decoding, rollout tokens per second) against
learning from them (forward and backward passes over the attempts that carry a signal).
"""
import json
import os

import rl


def bench_rl(checkpoint=os.path.join("out", "sft"), steps=5, **overrides):
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


if __name__ == "__main__":
    print(json.dumps(bench_rl()))
