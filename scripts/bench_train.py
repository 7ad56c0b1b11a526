"""Training throughput of the base recipe on each device, side by side in one run (samples/s, ratio to CPU).

Runs ``robolora.recipes.pretrain`` (the loop that made the shipped base: same preset, data pipeline, AdamW, bf16
autocast on CUDA) for a few hundred steps per (device, batch size) into a temporary folder and prints a markdown
table. samples/s is measured over the last logging window, so start-up and the first CUDA kernels are left out.

    python scripts/bench_train.py --data runs/base/data/reach runs/base/data/push --devices cpu cuda
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from robolora.recipes import pretrain
from robolora.train import TrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", type=Path, required=True, help="base-task dataset folders")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cpu and/or cuda (skipped if absent)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64])
    parser.add_argument("--cpu-steps", type=int, default=150)
    parser.add_argument("--cuda-steps", type=int, default=1000)
    parser.add_argument("--augment-shift", type=int, default=4, help="as the shipped base (default 4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    rows = []
    for device in args.devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("cuda: not available, skipped", file=sys.stderr)
            continue
        for batch in args.batch_sizes:
            steps = args.cuda_steps if device == "cuda" else args.cpu_steps
            config = TrainConfig(steps=steps, batch_size=batch, lr=3e-4, warmup_steps=min(100, steps // 10),
                                 device=device, log_every=max(10, steps // 4), checkpoint_every=steps,
                                 augment_shift=args.augment_shift)
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                metrics = pretrain(args.data, tmp, preset=args.preset, config=config)
                wall = time.perf_counter() - t0
            rows.append((device, batch, steps, metrics["train/samples_per_s"], wall))
            print(f"{device} batch {batch}: {metrics['train/samples_per_s']:.0f} samples/s", file=sys.stderr,
                  flush=True)

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-"
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"{torch.get_num_threads()} torch threads, GPU {name}, torch {torch.__version__}\n")
    base = next((r[3] for r in rows if r[0] == "cpu" and r[1] == 64), rows[0][3] if rows else 1.0)
    print("| device | batch | steps | samples/s | x CPU batch 64 | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for device, batch, steps, sps, wall in rows:
        print(f"| {device} | {batch} | {steps} | {sps:.0f} | {sps / base:.1f} | {wall:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
