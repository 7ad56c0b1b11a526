"""Benchmark the visuomotor policy presets: parameters, training throughput and acting latency.

Usage:
    python scripts/bench_policy.py                          # tiny and base, batch 64, 20 timed steps
    python scripts/bench_policy.py --presets base --steps 50 --threads 2
    python scripts/bench_policy.py --presets large --device cuda

``train samples/s`` times fwd + bwd + AdamW step on a fixed synthetic batch (uint8 images, random actions) after
``--warmup`` untimed steps. ``query ms`` is one ``predict_chunk`` at batch 1 under no_grad; ``select_action``
latencies are over ``--acts`` calls at batch 1 with the default execution horizon (4 of 8), so p50 is a queue pop
and p99 includes the model query made every 4th call. On a shared machine the numbers move with the load.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from robolora.policy import probe_batch
from robolora.policies import PolicyConfig, VisuomotorPolicy


def synthetic_batch(config: PolicyConfig, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """robolora.policy.probe_batch (the library's fixed observation batch) plus random action-chunk targets."""
    batch = probe_batch(VisuomotorPolicy(config), batch_size)
    g = torch.Generator().manual_seed(1)
    batch["action"] = torch.rand(batch_size, config.chunk_size, config.action_dim, generator=g) * 2 - 1
    batch["action_is_pad"] = torch.zeros(batch_size, config.chunk_size, dtype=torch.bool)
    return {k: v.to(device) for k, v in batch.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_preset(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    config = PolicyConfig.preset(name)
    policy = VisuomotorPolicy(config).to(device)
    batch = synthetic_batch(config, args.batch_size, device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    policy.train()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
        with autocast:
            loss, _ = policy(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    train_sps = args.steps * args.batch_size / (time.perf_counter() - start)

    policy.eval()
    one = {k: v[:1] for k, v in batch.items()}
    query_ms = []
    with torch.no_grad():
        for _ in range(args.acts // 4 + 3):
            t0 = time.perf_counter()
            policy.predict_chunk(one)
            sync(device)
            query_ms.append(1e3 * (time.perf_counter() - t0))
    obs = {k: v[0].cpu().numpy() for k, v in batch.items() if k in (*config.image_keys, "proprio")}
    policy.reset()
    act_ms = []
    for _ in range(args.acts):
        t0 = time.perf_counter()
        policy.select_action(obs)
        act_ms.append(1e3 * (time.perf_counter() - t0))
    return {
        "params": float(sum(p.numel() for p in policy.parameters())),
        "train_samples_per_s": train_sps,
        "query_ms": float(np.median(query_ms[3:])),
        "act_ms_p50": float(np.percentile(act_ms, 50)),
        "act_ms_p99": float(np.percentile(act_ms, 99)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "base"], help="PolicyConfig presets to time")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per preset")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps before timing")
    parser.add_argument("--acts", type=int, default=200, help="select_action calls timed at batch 1")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}")
    print(f"{'preset':8} {'params':>10} {'train samples/s':>16} {'query ms':>9} {'act p50 ms':>11} {'act p99 ms':>11}")
    for name in args.presets:
        r = bench_preset(name, args, device)
        print(f"{name:8} {r['params']:>10,.0f} {r['train_samples_per_s']:>16.0f} {r['query_ms']:>9.2f} "
              f"{r['act_ms_p50']:>11.3f} {r['act_ms_p99']:>11.2f}")


if __name__ == "__main__":
    main()
