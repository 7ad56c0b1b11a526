"""Benchmark an exported bundle against the torch policy: step latency side by side, and bundle size per file.

Usage:
    python scripts/bench_export.py                          # base preset (shipped weights if present), 1 and 2 threads
    python scripts/bench_export.py --skill runs/skills/wipe --repeats 1000
    python scripts/bench_export.py --base runs/base --threads 1

Exports ``--base`` (default ``policies/pretrained/base`` when its model.safetensors exists, else a random ``base``
preset policy; latency does not depend on the weights) with optional ``--skill`` into a temporary folder, then
times, interleaved call by call at batch 1 on CPU: ``query`` = one model call (onnxruntime ``session.run`` vs
torch ``predict_chunk`` under no_grad) and ``step`` = ``select_action`` with the chunk queue (controller vs torch
policy; p50 is a queue pop, p99 includes the query made every n_action_steps calls). The same thread count is given
to torch (``torch.set_num_threads``) and onnxruntime (intra-op threads). On a shared machine numbers move with load.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from robolora.adapters import attach_for_eval
from robolora.controller import BUNDLE_FILES, SPEC_FILE, load_bundle
from robolora.export import export_bundle, probe_inputs
from robolora.policies import PolicyConfig, VisuomotorPolicy, load_policy

SHIPPED = Path(__file__).resolve().parents[1] / "policies" / "pretrained" / "base"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=None, help="base checkpoint folder (default: shipped or random)")
    parser.add_argument("--preset", default="base", help="preset of the random policy when no checkpoint is used")
    parser.add_argument("--skill", type=Path, default=None, help="adapter folder to merge (default: base alone)")
    parser.add_argument("--repeats", type=int, default=500, help="timed calls per runner and thread count")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts to time")
    args = parser.parse_args(argv)
    base = args.base or (SHIPPED if (SHIPPED / "model.safetensors").is_file() else None)
    if base is not None:
        policy, source = load_policy(base), str(base)
    else:
        torch.manual_seed(0)
        policy, source = VisuomotorPolicy(PolicyConfig.preset(args.preset)).eval(), f"random '{args.preset}'"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = export_bundle(policy, args.skill, Path(tmp) / "bundle")
        export_s = time.perf_counter() - t0
        if args.skill is not None:
            attach_for_eval(policy, args.skill)
        print(f"policy {source}, skill {report['skill']}, export {export_s:.1f} s, "
              f"parity max abs diff {report['parity']['max_abs_diff']:.2e}")
        print(f"\n{'file':20} {'bytes':>12}")
        for name in (*BUNDLE_FILES, SPEC_FILE):
            print(f"{name:20} {(Path(tmp) / 'bundle' / name).stat().st_size:>12,}")

        probe = probe_inputs(policy, 1)
        obs = {k: v[0].numpy() for k, v in probe.items()}
        print(f"\nbatch 1, {args.repeats} interleaved calls each, ms")
        print(f"{'threads':>7} {'runner':24} {'query p50':>10} {'query p99':>10} {'step p50':>9} {'step p99':>9}")
        for threads in args.threads:
            torch.set_num_threads(threads)
            controller = load_bundle(Path(tmp) / "bundle", task_id=0, threads=threads)
            inputs = {k: v.numpy() for k, v in probe.items() if k in controller.spec.inputs}
            times: dict[str, list[float]] = {k: [] for k in ("oq", "tq", "os", "ts")}
            with torch.no_grad():
                for i in range(args.repeats + 20):  # the first 20 rounds warm up and are dropped
                    times["oq"].append(timed(lambda: controller.predict_chunk(inputs)))
                    times["tq"].append(timed(lambda: policy.predict_chunk(probe)))
                    times["os"].append(timed(lambda: controller.select_action(obs)))
                    times["ts"].append(timed(lambda: policy.select_action(obs)))
            p = {k: np.percentile(v[20:], [50, 99]) for k, v in times.items()}
            for runner, q, s in (("onnxruntime (bundle)", "oq", "os"), ("torch (eager, no_grad)", "tq", "ts")):
                print(f"{threads:>7} {runner:24} {p[q][0]:>10.3f} {p[q][1]:>10.3f} {p[s][0]:>9.3f} {p[s][1]:>9.3f}")


if __name__ == "__main__":
    main()
