"""Benchmark exported bundles: the controller against the torch policy, and multi-skill representations side by side.

Usage:
    python scripts/bench_export.py                          # base preset (shipped weights if present), 1 and 2 threads
    python scripts/bench_export.py --skill runs/skills/wipe --repeats 1000
    python scripts/bench_export.py --base runs/base --threads 1
    python scripts/bench_export.py --skills wipe,dish_rack --threads 1    # single-skill vs bank vs ORT multi-LoRA
    .venv-lerobot/bin/python scripts/bench_export.py --base runs/lerobot_act --skill runs/lerobot_wipe --threads 1

One skill (``--skill`` or none): exports ``--base`` (default ``policies/pretrained/base`` when its
model.safetensors exists, else a random ``base`` preset policy; latency does not depend on the weights) with the
optional skill into a temporary folder, then times, interleaved call by call at batch 1 on CPU: ``query`` = one
model call (onnxruntime ``session.run`` vs torch ``predict_chunk`` under no_grad) and ``step`` = ``select_action``
with the chunk queue (controller vs torch policy; p50 is a queue pop, p99 includes the query made every
n_action_steps calls). The same thread count is given to torch (``torch.set_num_threads``) and onnxruntime
(intra-op threads). On a shared machine numbers move with load.

Several skills (``--skills``): ``robolora export --skills`` writes the bank of merged graphs (one merged graph per
skill); beside it this script builds onnxruntime's multi-LoRA form of the same skills: one graph of the base with
the LoRA path unmerged whose A, B (scale folded into B) and skill token are graph inputs, and one onnxruntime
adapter file per skill (``onnxruntime.AdapterFormat``), selected per run with ``RunOptions.add_active_adapter``.
Both are checked against each other on probe observations, then timed interleaved: query and step of the first
skill for the single-skill bundle, the bank and multi-LoRA; a switch (bank: ``activate`` + the next tick applying
it, as the controller measures it; multi-LoRA switches by passing another skill's prebuilt RunOptions, timed as
queries alternating between skills); and, in a fresh process per representation, the resident memory added by
loading it and running one query per skill, beside its bytes on disk.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from torch import nn

from robolora.adapters import attach_active, attach_for_eval, load_adapter
from robolora.controller import BUNDLE_FILES, INDEX_FILE, SKILLS_DIR, SPEC_FILE, load_bundle, make_session
from robolora.export import ExportModule, export_bundle, export_skills, probe_inputs
from robolora.inject import lora_layers
from robolora.policies import PolicyConfig, VisuomotorPolicy, load_policy

SHIPPED = Path(__file__).resolve().parents[1] / "policies" / "pretrained" / "base"
LORA_GRAPH = "multi_lora.onnx"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def percentiles(times: list[float], warmup: int = 20) -> tuple[float, float]:
    p50, p99 = np.percentile(times[warmup:], [50, 99])
    return float(p50), float(p99)


# ------------------------------------------------------------------------------------ onnxruntime multi-LoRA
class LoRAInputs(nn.Module):
    """``ExportModule`` whose LoRA parameters and skill token are extra positional inputs (the tensors stand in for
    the parameters during the call; torch.func.functional_call refuses to run under the ONNX tracer)."""

    def __init__(self, module: ExportModule, names: list[str]) -> None:
        super().__init__()
        self.module, self.names, self.n_obs = module, names, len(module.input_names)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        params = dict(zip(self.names, args[self.n_obs:]))
        with torch.nn.utils.stateless._reparametrize_module(self.module, params):
            return self.module(*args[:self.n_obs])


def export_multi_lora(policy: nn.Module, skills: list[str], out: Path) -> dict[str, Path]:
    """The base with the first skill's LoRA unmerged, exported with every LoRA A/B and the skill token as graph
    inputs, plus one adapter file per skill holding its values (B scaled by s_skill / s_graph, rank padded with
    zeros to the graph's). Returns {skill: adapter file}."""
    import onnxruntime as ort

    adapters = [load_adapter(s) for s in skills]
    model = copy.deepcopy(policy).eval()
    first = attach_active(model, adapters[0])
    module = ExportModule(model).eval()
    names = [n for n, _ in module.named_parameters() if f".lora_A.{first}" in n or f".lora_B.{first}" in n
             or n.endswith("skill_token")]
    layers = lora_layers(model)
    graph_scale = {layer: layers[layer].configs[first].scaling for layer in layers}
    inputs = {n: n.removeprefix("policy.") for n in names}
    probe = probe_inputs(model, 1)
    args = tuple(probe[k] for k in module.input_names) + tuple(dict(module.named_parameters())[n].detach()
                                                                for n in names)
    torch.backends.mha.set_fastpath_enabled(False)
    with torch.no_grad():
        torch.onnx.export(LoRAInputs(module, names), args, str(out / LORA_GRAPH),
                          input_names=[*module.input_names, *inputs.values()], output_names=["actions"],
                          opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "batch"} for n in (*module.input_names, "actions")})
    torch.backends.mha.set_fastpath_enabled(True)
    # zero defaults make the LoRA inputs overridable initializers: onnxruntime's Python API then does not ask for
    # them in the feed, and the active adapter supplies them
    graph = onnx.load(str(out / LORA_GRAPH))
    for value in graph.graph.input:
        if value.name in inputs.values():
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
            graph.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(dims, np.float32), value.name))
    onnx.save(graph, str(out / LORA_GRAPH))
    files = {}
    for adapter in adapters:
        values = {}
        for name, graph_name in inputs.items():
            if name.endswith("skill_token"):
                values[graph_name] = adapter.skill_token.float().numpy()
                continue
            layer = name.removeprefix("policy.").split(".lora_")[0]
            shape = tuple(dict(module.named_parameters())[name].shape)
            a, b = adapter.lora.get(layer, (torch.zeros(0, shape[-1]), torch.zeros(shape[0], 0)))
            if ".lora_A." in name:
                value = torch.zeros(shape).index_copy_(0, torch.arange(a.shape[0]), a.float())
            else:
                scale = adapter.config.scaling / graph_scale[layer]
                value = torch.zeros(shape).index_copy_(1, torch.arange(b.shape[1]), b.float() * scale)
            values[graph_name] = value.numpy()
        fmt = ort.AdapterFormat()
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in values.items()})
        files[adapter.skill] = out / f"{adapter.skill}.onnx_adapter"
        fmt.export_adapter(str(files[adapter.skill]))
    return files


def lora_session(threads: int, folder: Path):
    """The multi-LoRA graph's CPU session (its LoRA inputs are overridable initializers; onnxruntime's warning about
    each of them is silenced)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    return ort.InferenceSession(str(folder / LORA_GRAPH), options, providers=["CPUExecutionProvider"])


def lora_run_options(files: dict[str, Path]) -> dict[str, object]:
    """One RunOptions per skill with its adapter active (the adapters stay memory-mapped)."""
    import onnxruntime as ort

    options = {}
    for skill, path in files.items():
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        run = ort.RunOptions()
        run.add_active_adapter(adapter)
        options[skill] = (run, adapter)
    return options


# ------------------------------------------------------------------------------------ memory, in a fresh process
def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(kind: str, folder: Path, threads: int) -> None:
    """Print the RSS added by loading representation ``kind`` from ``folder`` and running one query per skill."""
    before = rss_mb()
    with np.load(folder / "probe.npz") as probe:
        obs = {k: probe[k] for k in probe.files}
    if kind == "multi_lora":
        session = lora_session(threads, folder)
        runs = lora_run_options({p.stem: p for p in folder.glob("*.onnx_adapter")})
        for run, _ in runs.values():
            session.run(["actions"], obs, run_options=run)
    else:
        controller = load_bundle(folder, threads=threads)
        for skill in controller.skills:
            if skill is not None:
                controller.activate(skill)
            controller.select_action({k: v[0] for k, v in obs.items()})
    print(json.dumps({"rss_mb": rss_mb() - before}))


def memory_of(kind: str, folder: Path, threads: int) -> float:
    done = subprocess.run([sys.executable, __file__, "--memory-child", kind, str(folder), "--threads", str(threads)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["rss_mb"]


def folder_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in path.rglob(pattern) if f.is_file())


# ------------------------------------------------------------------------------------ the benchmarks
def bench_one(policy: nn.Module, source: str, skill: Path | None, repeats: int, threads_list: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = export_bundle(policy, skill, Path(tmp) / "bundle")
        export_s = time.perf_counter() - t0
        if skill is not None:
            attach_for_eval(policy, skill)
        print(f"policy {source}, skill {report['skill']}, export {export_s:.1f} s, "
              f"parity max abs diff {report['parity']['max_abs_diff']:.2e}")
        print(f"\n{'file':20} {'bytes':>12}")
        for name in (*BUNDLE_FILES, SPEC_FILE):
            print(f"{name:20} {(Path(tmp) / 'bundle' / name).stat().st_size:>12,}")

        probe = probe_inputs(policy, 1)
        obs = {k: v[0].numpy() for k, v in probe.items()}
        print(f"\nbatch 1, {repeats} interleaved calls each, ms")
        print(f"{'threads':>7} {'runner':24} {'query p50':>10} {'query p99':>10} {'step p50':>9} {'step p99':>9}")
        for threads in threads_list:
            torch.set_num_threads(threads)
            controller = load_bundle(Path(tmp) / "bundle", task_id=0 if policy.spec.task_key else None,
                                     threads=threads)
            inputs = {k: v.numpy() for k, v in probe.items() if k in controller.spec.inputs}
            times: dict[str, list[float]] = {k: [] for k in ("oq", "tq", "os", "ts")}
            with torch.no_grad():
                for _ in range(repeats + 20):  # the first 20 rounds warm up and are dropped
                    times["oq"].append(timed(lambda: controller.predict_chunk(inputs)))
                    times["tq"].append(timed(lambda: policy.predict_chunk(probe)))
                    times["os"].append(timed(lambda: controller.select_action(obs)))
                    times["ts"].append(timed(lambda: policy.select_action(obs)))
            p = {k: percentiles(v) for k, v in times.items()}
            for runner, q, s in (("onnxruntime (bundle)", "oq", "os"), ("torch (eager, no_grad)", "tq", "ts")):
                print(f"{threads:>7} {runner:24} {p[q][0]:>10.3f} {p[q][1]:>10.3f} {p[s][0]:>9.3f} {p[s][1]:>9.3f}")


def bench_skills(policy: nn.Module, source: str, skills: list[str], repeats: int, threads_list: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        index = export_skills(policy, skills, root / "bank")
        bank_s = time.perf_counter() - t0
        names = index["skills"]
        single = root / "bank" / SKILLS_DIR / names[0]  # a single-skill bundle, as robolora export --skill writes
        (root / "lora").mkdir()
        t0 = time.perf_counter()
        adapter_files = export_multi_lora(policy, skills, root / "lora")
        lora_s = time.perf_counter() - t0
        probe = probe_inputs(policy, 1)
        obs = {k: v[0].numpy() for k, v in probe.items()}
        feeds = {k: v.numpy() for k, v in probe.items() if k in load_bundle(single).spec.inputs}
        for folder in (single, root / "bank", root / "lora"):
            np.savez(folder / "probe.npz", **feeds)

        print(f"policy {source}, skills {names}; export: bank {bank_s:.1f} s, multi-LoRA {lora_s:.1f} s")
        bank = load_bundle(root / "bank", threads=threads_list[0])
        session = lora_session(threads_list[0], root / "lora")
        runs = lora_run_options(adapter_files)
        for skill in names:
            bank.activate(skill)
            bank.select_action(obs)
            diff = np.abs(bank.predict_chunk(feeds) - session.run(["actions"], feeds, run_options=runs[skill][0])[0])
            print(f"  {skill}: multi-LoRA vs bank max abs diff {diff.max():.2e}")

        print(f"\n{'representation':24} {'bytes on disk':>14} {'RSS added (MB)':>15}")
        sizes = {"single-skill bundle": (folder_bytes(single, "policy.onnx"), memory_of("bundle", single, 1)),
                 f"bank ({len(names)} merged graphs)": (folder_bytes(root / "bank", "policy.onnx"),
                                                        memory_of("bundle", root / "bank", 1)),
                 f"ORT multi-LoRA (1 + {len(names)})": (folder_bytes(root / "lora", "*.onnx*"),
                                                      memory_of("multi_lora", root / "lora", 1))}
        for name, (size, rss) in sizes.items():
            print(f"{name:24} {size:>14,} {rss:>15.1f}")
        print("  (bytes: the ONNX graphs and adapter files the controller loads; .pt2 and safetensors not counted)")

        print(f"\nbatch 1, skill {names[0]}, {repeats} interleaved calls each, ms; a bank switch (activate + "
              f"applying it at the next tick) in us")
        print(f"{'threads':>7} {'representation':30} {'query p50':>10} {'query p99':>10} {'step p50':>9} "
              f"{'step p99':>9}")
        for threads in threads_list:
            one = load_bundle(single, threads=threads)
            bank = load_bundle(root / "bank", threads=threads)
            lora = load_bundle(single, threads=threads)  # its chunk queue, its queries through the multi-LoRA graph
            session = lora_session(threads, root / "lora")
            runs = lora_run_options(adapter_files)
            lora.predict_chunk = lambda inputs: session.run(["actions"], dict(inputs), run_options=runs[names[0]][0])[0]
            switcher = load_bundle(root / "bank", threads=threads)
            times: dict[str, list[float]] = {k: [] for k in ("1q", "1s", "bq", "bs", "lq", "ls", "la")}
            for i in range(repeats + 20):
                other = runs[names[i % len(names)]][0]
                times["1q"].append(timed(lambda: one.predict_chunk(feeds)))
                times["bq"].append(timed(lambda: bank.predict_chunk(feeds)))
                times["lq"].append(timed(lambda: lora.predict_chunk(feeds)))
                times["la"].append(timed(lambda: session.run(["actions"], feeds, run_options=other)))
                times["1s"].append(timed(lambda: one.select_action(obs)))
                times["bs"].append(timed(lambda: bank.select_action(obs)))
                times["ls"].append(timed(lambda: lora.select_action(obs)))
                switcher.activate(names[i % len(names)])
                switcher.select_action(obs)
            for name, q, s in (("single-skill bundle", "1q", "1s"), ("bank", "bq", "bs"),
                               ("ORT multi-LoRA", "lq", "ls")):
                (q50, q99), (s50, s99) = percentiles(times[q]), percentiles(times[s])
                print(f"{threads:>7} {name:30} {q50:>10.3f} {q99:>10.3f} {s50:>9.3f} {s99:>9.3f}")
            (a50, a99) = percentiles(times["la"])
            print(f"{threads:>7} {'ORT multi-LoRA, skills alternating':30} {a50:>10.3f} {a99:>10.3f}")
            switch_us = 1e6 * np.asarray(switcher.switch_s)
            print(f"{threads:>7} bank switch p50 / p99 / max: {np.percentile(switch_us, 50):.1f} / "
                  f"{np.percentile(switch_us, 99):.1f} / {switch_us.max():.1f} us over {switch_us.size} switches")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=None,
                        help="base checkpoint folder or LeRobot policy folder (default: shipped or random)")
    parser.add_argument("--preset", default="base", help="preset of the random policy when no checkpoint is used")
    parser.add_argument("--skill", type=Path, default=None, help="adapter folder to merge (default: base alone)")
    parser.add_argument("--skills", default=None,
                        help="comma-separated skills (adapter folders or shipped names): compare representations")
    parser.add_argument("--repeats", type=int, default=500, help="timed calls per runner and thread count")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts to time")
    parser.add_argument("--memory-child", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child[0], Path(args.memory_child[1]), args.threads[0])
        return
    base = args.base or (SHIPPED if (SHIPPED / "model.safetensors").is_file() else None)
    if base is not None:
        from robolora.cli import load_base  # a robolora checkpoint or a LeRobot policy folder (lerobot extra)

        policy, source = load_base(base, action_bounds=(-1.0, 1.0)), str(base)
    else:
        torch.manual_seed(0)
        policy, source = VisuomotorPolicy(PolicyConfig.preset(args.preset)).eval(), f"random '{args.preset}'"
    if args.skills:
        bench_skills(policy, source, [s.strip() for s in args.skills.split(",") if s.strip()], args.repeats,
                     args.threads)
    else:
        bench_one(policy, source, args.skill, args.repeats, args.threads)


if __name__ == "__main__":
    main()
