"""First LoRA cost figures (issue 2; docs/design.md §4): step latency of a plain transformer vs the same model with an
unmerged LoRA adapter on q/k/v/o, vs merged, plus whole-model merge and unmerge times.

The model is a stand-alone pre-norm transformer encoder shaped like the policy's trunk (separate q/k/v/o
``nn.Linear`` + ``F.scaled_dot_product_attention``, MLP x4). Step latencies are measured interleaved (one plain,
one unmerged, one merged step per round, in a rotating order) so machine noise hits all three alike.

Usage:
    python scripts/bench_lora.py                       # 4 layers, d=256, batch 1, 26 tokens, r=8, CPU
    python scripts/bench_lora.py --threads 2 --rounds 500
    python scripts/bench_lora.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robolora.config import ATTENTION_TARGETS, LoRAConfig
from robolora.inject import inject_lora, lora_layers, merge_adapter, set_active_adapter, unmerge


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.q, self.attn.k, self.attn.v, self.attn.o = (nn.Linear(d, d) for _ in range(4))
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.attn.q, self.attn.k,
                                                                                          self.attn.v))  # (B,H,T,Dh)
        x = x + self.attn.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))  # (B,T,D)
        return x + self.mlp(self.ln2(x))


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def measure(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return measure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=26, help="sequence length (policy: patches + proprio + task + K)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=300, help="interleaved rounds of the three step timings")
    parser.add_argument("--merge-reps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = least noise when shared)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    measure = _timer(device)

    plain = nn.Sequential(*(Block(args.d_model, args.heads) for _ in range(args.layers))).to(device).eval()
    unmerged = copy.deepcopy(plain)
    inject_lora(unmerged, LoRAConfig(rank=args.rank, targets=ATTENTION_TARGETS), generator=torch.Generator())
    with torch.no_grad():
        for layer in lora_layers(unmerged).values():
            layer.lora_B["default"].normal_(0.0, 0.01)
    set_active_adapter(unmerged, "default")
    merged = copy.deepcopy(unmerged)
    merge_adapter(merged, "default")

    x = torch.randn(1, args.tokens, args.d_model, device=device)
    models = {"plain": plain, "lora unmerged": unmerged, "lora merged": merged}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(20):
            for model in models.values():
                model(x)
        names = list(models)
        for i in range(args.rounds):
            for name in names[i % 3:] + names[:i % 3]:
                times[name].append(measure(lambda m=models[name]: m(x)))
        merge_times = [measure(lambda: merge_adapter(unmerged, "default")) for _ in range(args.merge_reps)]
        unmerge_times = []
        for _ in range(args.merge_reps):
            merge_adapter(unmerged, "default")
            unmerge_times.append(measure(lambda: unmerge(unmerged)))

    ms = {name: np.array(t) * 1e3 for name, t in times.items()}
    p50 = {name: float(np.percentile(t, 50)) for name, t in ms.items()}
    print(f"LoRA bench: {args.layers} layers, d={args.d_model}, batch 1, {args.tokens} tokens, r={args.rank} on "
          f"q/k/v/o ({len(lora_layers(unmerged))} layers), device={device}, threads={args.threads}, "
          f"torch {torch.__version__}, {args.rounds} interleaved rounds")
    print(f"{'':<22}{'p50 ms':>10}{'p99 ms':>10}{'vs plain (p50)':>16}")
    for name, t in ms.items():
        print(f"{name + ' step':<22}{p50[name]:>10.3f}{np.percentile(t, 99):>10.3f}{p50[name] / p50['plain']:>15.2f}x")
    print(f"{'merge (whole model)':<22}{np.percentile(np.array(merge_times) * 1e3, 50):>10.3f}")
    print(f"{'unmerge (whole model)':<22}{np.percentile(np.array(unmerge_times) * 1e3, 50):>10.3f}")


if __name__ == "__main__":
    main()
