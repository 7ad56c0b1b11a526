"""``robolora demo``: attach two LoRA skills to the visuomotor transformer, switch, merge, and measure.

A CPU demonstration of the LoRA core on the ``base`` policy architecture with batch-1 observations, as a control
loop sees them. The two adapters are randomly initialised with a non-zero B (untrained: the point is the
mechanics, not the behaviour). It checks and reports what users rely on: a fresh adapter changes nothing,
each skill changes the output, switching back restores a skill's output exactly, merged equals unmerged,
unmerging restores W0 bit-exactly, and what merging and the unmerged LoRA path cost.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from robolora.config import LoRAConfig
from robolora.inject import inject_lora, lora_layers, merge_adapter, set_active_adapter, unmerge
from robolora.policies import PolicyConfig, VisuomotorPolicy


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def probe_batch(config: PolicyConfig, batch_size: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed random observation batch in the policy's input format."""
    g = torch.Generator().manual_seed(seed)
    batch = {key: torch.randint(0, 256, (batch_size, config.image_size, config.image_size, 3), generator=g,
                                dtype=torch.uint8) for key in config.image_keys}
    batch["proprio"] = torch.randn(batch_size, config.proprio_dim, generator=g)
    batch["task_id"] = torch.zeros(batch_size, dtype=torch.long)
    return batch


@torch.no_grad()
def lora_demo(preset: str = "base", rank: int = 8, repeats: int = 200, seed: int = 0) -> dict[str, float]:
    """Run the demonstration; returns measured values with slash keys."""
    torch.manual_seed(seed)
    policy = VisuomotorPolicy(PolicyConfig.preset(preset)).eval()
    batch = probe_batch(policy.config)
    plain = policy.predict_chunk(batch)
    w0 = {n: p.detach().clone() for n, p in policy.named_parameters()}
    plain_ms = _median_ms(lambda: policy.predict_chunk(batch), repeats)

    config = LoRAConfig(rank=rank, alpha=2 * rank)
    g = torch.Generator().manual_seed(seed)
    for skill in ("wipe", "dish_rack"):
        inject_lora(policy, config, skill, generator=g)
    set_active_adapter(policy, "wipe")
    fresh_diff = (policy.predict_chunk(batch) - plain).abs().max().item()
    for layer in lora_layers(policy).values():  # stand-in for training: give every B non-zero values
        for b in layer.lora_B.values():
            b.normal_(0, 0.05, generator=g)

    out = {}
    for skill in ("wipe", "dish_rack"):
        set_active_adapter(policy, skill)
        out[skill] = policy.predict_chunk(batch)
    set_active_adapter(policy, "wipe")
    restore_diff = (policy.predict_chunk(batch) - out["wipe"]).abs().max().item()
    unmerged_ms = _median_ms(lambda: policy.predict_chunk(batch), repeats)

    t0 = time.perf_counter()
    merge_adapter(policy, "dish_rack")
    merge_ms = (time.perf_counter() - t0) * 1e3
    set_active_adapter(policy, "dish_rack")
    merged_diff = (policy.predict_chunk(batch) - out["dish_rack"]).abs().max().item()
    merged_ms = _median_ms(lambda: policy.predict_chunk(batch), repeats)
    t0 = time.perf_counter()
    unmerge(policy)
    unmerge_ms = (time.perf_counter() - t0) * 1e3
    set_active_adapter(policy, None)
    names = {n.replace(".base_layer", ""): p for n, p in policy.named_parameters() if "lora_" not in n}
    exact = all(torch.equal(names[n], w) for n, w in w0.items())
    return {
        "demo/params_base": float(sum(w.numel() for w in w0.values())),
        "demo/params_per_skill": float(sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n) / 2),
        "demo/fresh_adapter_max_diff": fresh_diff,
        "demo/skill_output_gap": (out["wipe"] - out["dish_rack"]).abs().max().item(),
        "demo/switch_back_max_diff": restore_diff,
        "demo/merged_vs_unmerged_max_diff": merged_diff,
        "demo/base_restored_bit_exact": float(exact),
        "demo/plain_step_ms": plain_ms,
        "demo/unmerged_step_ms": unmerged_ms,
        "demo/merged_step_ms": merged_ms,
        "demo/unmerged_overhead": unmerged_ms / plain_ms,
        "demo/merge_ms": merge_ms,
        "demo/unmerge_ms": unmerge_ms,
    }
