"""bench_train(): the training benchmark (to be folded into bench.py as `bench.py train`).

Trains a preset on the current device through train_gpt.train() and reports what a practitioner compares:
throughput (tokens/s), MFU on CUDA (model FLOPs / GPU peak), peak memory, the final validation bits per
byte, and the wall time from launch until validation first reached a target bits per byte.
"""
import json
import os
import resource
import time

import torch

import train_gpt


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


def bench_train(preset="tiny", target_bpb=2.2, out_dir=os.path.join("out", "bench", "train"), **overrides):
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


if __name__ == "__main__":
    print(json.dumps(bench_train()))
