"""``robolora demo``: the main job (kitchen rollout with shipped skills) and the LoRA mechanics demonstration.

:func:`kitchen_demo` runs the two-stage kitchen with the shipped base and skill adapters, switching skills at run
time, and writes a video and a plot. :func:`lora_demo` is a CPU demonstration of the LoRA core on the ``base`` policy architecture with batch-1 observations, as a control
loop sees them. The two adapters are randomly initialised with a non-zero B (untrained: the point is the
mechanics, not the behaviour). It checks and reports what users rely on: a fresh adapter changes nothing,
each skill changes the output, switching back restores a skill's output exactly, merged equals unmerged,
unmerging restores W0 bit-exactly, and what merging and the unmerged LoRA path cost.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from robolora.config import LoRAConfig
from robolora.inject import inject_lora, lora_layers, merge_adapter, set_active_adapter, unmerge
from robolora.policies import PolicyConfig, VisuomotorPolicy
from robolora.policy import probe_batch


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@torch.no_grad()
def lora_demo(preset: str = "base", rank: int = 8, repeats: int = 200, seed: int = 0) -> dict[str, float]:
    """Run the demonstration; returns measured values with slash keys."""
    torch.manual_seed(seed)
    policy = VisuomotorPolicy(PolicyConfig.preset(preset)).eval()
    batch = probe_batch(policy)
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


def _interleaved_ms(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median latency of each callable, measured round-robin so machine noise hits all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


@torch.no_grad()
def step_latency(base: str | Any, skill: str | Any, repeats: int = 300, device: str = "cpu") -> dict[str, float]:
    """Batch-1 step latency (ms) of the plain base vs the base with ``skill`` active in bank and unmerged mode."""
    from robolora.policies import load_policy
    from robolora.rollout import resolve_skill
    from robolora.skills import SkillManager

    policies = {mode: load_policy(base, device=device).eval() for mode in ("plain", "bank", "unmerged")}
    managers = {}
    for mode in ("bank", "unmerged"):
        managers[mode] = SkillManager(policies[mode], mode=mode)
        name = managers[mode].load(resolve_skill(skill)).skill
        managers[mode].activate(name)
        managers[mode].apply_pending()
    batch = {k: v.to(device) for k, v in probe_batch(policies["plain"]).items()}
    fns: dict[str, Callable[[], Any]] = {"plain": lambda: policies["plain"].predict_chunk(batch)}
    fns.update({mode: functools.partial(m.predict_chunk, batch) for mode, m in managers.items()})
    for fn in fns.values():  # warm-up
        fn()
    result = _interleaved_ms(fns, repeats)
    for m in managers.values():
        m.close()
    return result


def kitchen_demo(base: str | Any, skills: tuple[str, ...] = ("wipe", "dish_rack"), episodes: int = 10,
                 out_dir: str | Any = "robolora_demo", device: str = "cpu",
                 progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The main job: kitchen episodes with the shipped skills switched at run time, a video and a plot.

    Runs :func:`robolora.rollout.rollout_main` (bank mode, switch on stage success), records the first episode as
    ``out_dir/kitchen.gif``, measures the plain base against the skill-active policy (bank and unmerged) and
    draws ``out_dir/demo.png``. Returns the rollout metrics plus ``demo/latency_ms/<mode>``.
    """
    from pathlib import Path

    from robolora.rollout import rollout_main

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = rollout_main(list(skills), base, episodes=episodes, video_path=out / "kitchen.gif", device=device,
                           progress=progress)
    latency = step_latency(base, skills[-1], device=device)
    metrics.update({f"demo/latency_ms/{k}": v for k, v in latency.items()})
    metrics["plot"] = str(_plot(metrics, skills, latency, out / "demo.png"))
    return metrics


def _plot(metrics: dict[str, Any], skills: tuple[str, ...], latency: dict[str, float], path: Any) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    keys = [f"rollout/stage{i}/{s}" for i, s in enumerate(skills)] + ["rollout"]
    labels = [f"stage {i + 1}\n{s}" for i, s in enumerate(skills)] + ["overall"]
    rates = [metrics[f"{k}/success_rate"] for k in keys]
    err = [[r - metrics[f"{k}/ci_low"] for r, k in zip(rates, keys)],
           [metrics[f"{k}/ci_high"] - r for r, k in zip(rates, keys)]]
    ax1.bar(labels, rates, yerr=err, capsize=4, color=["#4c9be8", "#f0a030", "#50b060"])
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel("success rate (95% Wilson CI)")
    ax1.set_title(f"kitchen, {metrics['rollout/episodes']} held-out episodes")
    names = {"plain": "plain base", "bank": "skill (bank)", "unmerged": "skill (unmerged)"}
    ax2.bar([names[k] for k in latency], list(latency.values()), color=["#888888", "#50b060", "#f0a030"])
    ax2.set_ylabel("policy query latency, batch 1 (ms, median)")
    ax2.set_title(f"switch p99 {metrics['rollout/switch_us_p99']:.0f} us (bank)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
