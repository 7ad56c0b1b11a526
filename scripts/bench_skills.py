"""Skill switching benchmark (issue 6; docs/design.md §4): SkillManager's modes against PEFT on both policies.

One run, side by side, batch 1, LoRA r=8 (``--rank``), every adapter with a skill token (PEFT has none: its
switches move the LoRA weights only), on
- the visuomotor policy, shipped base config and a larger one (12 layers, d=512): 4 skills on attn.q/k/v/o;
- the ACT-style policy (``--act-preset``, base by default): 16 skills (``--act-skills``) on q/k/v/out_proj of every
  nn.MultiheadAttention (self_attn, cross_attn) and on the feed-forward linear1/linear2. PEFT's LoRA on an
  nn.MultiheadAttention is one adapter on the packed in_proj_weight and one on out_proj, of one rank; the same
  adapters reach PEFT through ``robolora.adapters.to_peft(adapter, path, policy)`` (q/k/v as one block-diagonal
  rank-3r adapter, out_proj padded); the parity line checks it.
Measured:
- step latency p50/p99 of ``predict_chunk`` under no_grad: plain base, bank, inplace (also with
  ``cache_merged``), unmerged, PEFT unmerged, PEFT merged. Variants are timed in interleaved rounds (rotating
  order) so machine noise hits them alike; the ratio to the plain base is given from wall-clock p50 and from
  per-thread CPU-time p50 (immune to preemption by other processes; on a shared machine report both);
- switch latency p50/p99/max (wall) and CPU-time p99, cycling the attached skills, each switch timed right after
  an untimed step of the model it switches, as in a control loop (caches as a step leaves them): ours is
  ``activate`` + ``apply_pending`` (all the work of a switch, wherever it runs); PEFT ``set_adapter``,
  ``unmerge_adapter`` + ``set_adapter`` + ``merge_adapter``, ``hotswap_adapter`` (from the adapter folder, as
  documented) and ``hotswap_adapter_from_state_dict`` (preloaded);
- memory per attached skill (tensor bytes the skill adds);
- recompiles under ``torch.compile`` while cycling 16 skills (``--compile-skills``) twice, on every config but
  12x512 (dynamo with a counting backend, so no C++ compiler is needed; guards, and therefore recompiles, are
  decided by dynamo, not by the backend).

- ``--lerobot-policy FOLDER`` adds the config ``lerobot``: a saved LeRobot ACT (a ``lerobot-train`` output; needs
  the lerobot extra, so run it from ``.venv-lerobot``) with ``--act-skills`` skills on
  ``LeRobotPolicy.lora_targets + lora_mlp_targets`` (no skill token: LeRobot's ACT has no hook for one);
- ``--bit-switches N`` (default 10,000): after N more switches in each mode and ``close()``, whether every base
  parameter and buffer is bit-identical to before the manager was built.

Usage:
    python scripts/bench_skills.py                            # base + 12x512 + act, ~5 min on 2 busy cores
    python scripts/bench_skills.py --configs act --step-rounds 100           # ACT only, ~2.5 min
    python scripts/bench_skills.py --configs act --act-preset tiny --act-skills 2 --step-rounds 3 --no-compile
    python scripts/bench_skills.py --configs base --step-rounds 600
    python scripts/bench_skills.py --threads 2 --device cuda
    .venv-lerobot/bin/python scripts/bench_skills.py --configs lerobot --lerobot-policy runs/act --no-compile
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from robolora.adapters import SkillAdapter, to_peft
from robolora.config import ATTENTION_TARGETS, LoRAConfig
from robolora.inject import target_matches, target_shapes
from robolora.lora_mha import PROJECTIONS
from robolora.policies import ACTConfig, ACTPolicy, PolicyConfig, VisuomotorPolicy, base_fingerprint
from robolora.policy import probe_batch
from robolora.skills import MODES, SkillManager

ACT_TARGETS = (*(f"{attn}.{p}" for attn in ("self_attn", "cross_attn") for p in PROJECTIONS), "linear1", "linear2")
CONFIGS = ("base", "12x512", "act", "lerobot")  # the keys of setups()
MB = 1 << 20


@dataclass(frozen=True)
class Setup:
    """One benchmarked policy: its row label, how to build it, its LoRA targets and how many skills it holds."""

    label: str
    build: Callable[[], nn.Module]
    targets: tuple[str, ...]
    skills: int
    large: bool = False  # timed for --large-rounds rounds (else --step-rounds); no recompile count
    compile: bool = True  # counted under torch.compile (unless large)


def lerobot_setup(args: argparse.Namespace) -> Setup:
    """A LeRobot ACT folder behind the protocol (robolora.integrations.lerobot), LoRA on attention and MLP."""
    from robolora.integrations.lerobot import LeRobotPolicy, load_lerobot_policy

    if args.lerobot_policy is None:
        raise SystemExit("--configs lerobot needs --lerobot-policy FOLDER (a lerobot-train output or policy folder)")
    return Setup(f"lerobot {Path(args.lerobot_policy).name}",
                 lambda: load_lerobot_policy(args.lerobot_policy, action_bounds=(-1.0, 1.0)),
                 LeRobotPolicy.lora_targets + LeRobotPolicy.lora_mlp_targets, args.act_skills, compile=False)


def setups(args: argparse.Namespace) -> dict[str, Setup]:
    """The configs ``--configs`` chooses from."""
    return {
        "base": Setup("base", lambda: VisuomotorPolicy(PolicyConfig.preset("base")), ATTENTION_TARGETS, 4),
        "12x512": Setup("12x512", lambda: VisuomotorPolicy(PolicyConfig.preset("base", d_model=512, n_layers=12,
                                                                                n_heads=8)),
                        ATTENTION_TARGETS, 4, large=True),
        "act": Setup(f"act {args.act_preset}", lambda: ACTPolicy(ACTConfig.preset(args.act_preset)), ACT_TARGETS,
                     args.act_skills),
        **({"lerobot": lerobot_setup(args)} if "lerobot" in args.configs else {}),
    }


def make_adapters(policy: nn.Module, targets: tuple[str, ...], count: int, rank: int,
                  seed: int) -> list[SkillAdapter]:
    """``count`` adapters shaped like trained ones: A ~ N(0, 1/r^2), B ~ N(0, 0.02^2), a random skill token."""
    g = torch.Generator().manual_seed(seed)
    config = LoRAConfig(rank=rank, alpha=2.0 * rank, targets=targets)
    shapes = {n: s for n, s in target_shapes(policy).items() if any(target_matches(n, p) for p in targets)}
    fingerprint = base_fingerprint(policy)
    adapters = []
    for i in range(count):
        lora = {n: (torch.randn(rank, d_in, generator=g) / rank, torch.randn(d_out, rank, generator=g) * 0.02)
                for n, (d_out, d_in) in shapes.items()}
        dim = policy.spec.skill_token_dim
        token = None if dim is None else torch.randn(dim, generator=g) * 0.02
        adapters.append(SkillAdapter(f"s{i}", config, lora, token, fingerprint))
    return adapters


def peft_parity(peft_unmerged: nn.Module, ours: SkillManager, batch: dict[str, torch.Tensor]) -> str:
    """How far PEFT's actions are from ours for the adapter active in both. ``robolora.adapters.to_peft`` writes
    attention adapters so that the installed peft reproduces ours, including peft 0.21.2's double application of
    an attention out_proj delta (huggingface/peft#3774, compensated in the written file)."""
    with torch.no_grad():
        actions = peft_unmerged.base_model.model.predict_chunk(batch)
        return f"max |diff| = {(actions - ours.predict_chunk(batch)).abs().max():.2e}"


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.thread_time() - cpu


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device, warmup: int = 5,
                before: dict[str, Callable[[], object]] | None = None) -> dict[str, np.ndarray]:
    """Run every fn once per round in a rotating order, each right after its untimed ``before`` call if any;
    returns {name: (rounds, 2) [wall, cpu] seconds}."""
    names = list(fns)
    out: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    gc.collect()
    gc.disable()  # as timeit does: a GC pass set off by one variant's garbage must not be billed to another
    try:
        for r in range(warmup + rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                if before is not None:
                    before[name]()
                t = timed(fns[name], device)
                if r >= warmup:
                    out[name].append(t)
    finally:
        gc.enable()
    return {n: np.asarray(v) for n, v in out.items()}


def managers(policy: nn.Module, adapters: list[SkillAdapter]) -> dict[str, SkillManager]:
    out = {}
    for label, mode, cache in [(m, m, False) for m in MODES] + [("inplace (cache_merged)", "inplace", True)]:
        mgr = SkillManager(copy.deepcopy(policy), mode, cache_merged=cache)
        for adapter in adapters:
            mgr.attach(adapter.skill, adapter)
        mgr.activate(adapters[0].skill)
        mgr.apply_pending()
        out[label] = mgr
    return out


def peft_model(policy: nn.Module, folders: list[Path], names: list[str] | None) -> nn.Module:
    """A PeftModel over a copy of the policy with every folder loaded (names None: one adapter, "default")."""
    from peft import PeftModel

    first = names[0] if names else "default"
    model = PeftModel.from_pretrained(copy.deepcopy(policy), str(folders[0]), adapter_name=first)
    for folder, name in zip(folders[1:], (names or [])[1:]):
        model.load_adapter(str(folder), adapter_name=name)
    model.set_adapter(first)
    return model.eval()


def peft_switches(policy: nn.Module, folders: list[Path], names: list[str], unmerged: nn.Module,
                  merged: nn.Module) -> tuple[dict[str, Callable[[int], object]], dict[str, nn.Module]]:
    """PEFT's ways to switch, and the PeftModel each one switches."""
    from peft.utils.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict

    hot = peft_model(policy, folders[:1], None)

    def remerge(i: int) -> None:
        merged.unmerge_adapter()
        merged.set_adapter(names[i])
        merged.merge_adapter()

    out = {"PEFT set_adapter": lambda i: unmerged.set_adapter(names[i]), "PEFT unmerge+set+merge": remerge,
           "PEFT hotswap_adapter": lambda i: hotswap_adapter(hot, str(folders[i]), "default", torch_device="cpu")}
    try:  # the in-memory variant needs PEFT's key renaming, a private helper that may move between versions
        from peft.utils.save_and_load import _insert_adapter_name_into_state_dict, load_peft_weights

        states = [_insert_adapter_name_into_state_dict(load_peft_weights(str(f), device="cpu"), "default", "lora_")
                  for f in folders]
        config = hot.peft_config["default"]
        out["PEFT hotswap (state dict)"] = lambda i: hotswap_adapter_from_state_dict(hot, states[i], "default", config)
    except ImportError as e:
        print(f"(PEFT hotswap_adapter_from_state_dict skipped: {e})")
    models = {"PEFT set_adapter": unmerged, "PEFT unmerge+set+merge": merged}
    return out, {name: models.get(name, hot) for name in out}


def peft_bytes(model: nn.Module, name: str) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if f".{name}." in n)


def bench_config(setup: Setup, args: argparse.Namespace, device: torch.device, peft_ok: bool,
                 workdir: Path) -> list[str]:
    label = setup.label
    torch.manual_seed(args.seed)
    policy = setup.build().to(device).eval()
    batch = {k: v.to(device) for k, v in probe_batch(policy).items()}
    adapters = make_adapters(policy, setup.targets, setup.skills, args.rank, args.seed)
    names = [a.skill for a in adapters]
    ours = managers(policy, adapters)
    steps: dict[str, Callable[[], object]] = {"plain base": lambda: policy.predict_chunk(batch)}
    steps.update({mode: (lambda m=m: m.predict_chunk(batch)) for mode, m in ours.items()})
    memory = {mode: m.memory_bytes()[names[0]] for mode, m in ours.items()}
    switch_fns: dict[str, Callable[[int], object]] = {}
    for mode, mgr in ours.items():
        def switch(i: int, mgr: SkillManager = mgr) -> None:
            mgr.activate(names[i])
            mgr.apply_pending()
        switch_fns[mode] = switch
    switched_step = {mode: steps[mode] for mode in ours}  # what runs (untimed) right before each switch
    if peft_ok:
        folders = [to_peft(a, workdir / label / a.skill, policy) for a in adapters]
        unmerged, merged = peft_model(policy, folders, names), peft_model(policy, folders, names)
        merged.merge_adapter()
        if adapters[0].skill_token is not None:
            for model in (unmerged, merged):
                model.base_model.model.set_skill_token(nn.Parameter(adapters[0].skill_token.to(device), False))
        steps["PEFT unmerged"] = lambda: unmerged.base_model.model.predict_chunk(batch)
        steps["PEFT merged"] = lambda: merged.base_model.model.predict_chunk(batch)
        peft_fns, peft_models = peft_switches(policy, folders, names, unmerged, merged)
        switch_fns.update(peft_fns)
        switched_step.update({k: (lambda m=m: m.base_model.model.predict_chunk(batch)) for k, m in peft_models.items()})
        memory["PEFT unmerged"] = memory["PEFT merged"] = peft_bytes(unmerged, names[0])
        print(f"[{label}] parity, PEFT unmerged vs ours (skill {names[0]}): "
              f"{peft_parity(unmerged, ours['unmerged'], batch)}")

    rounds = args.large_rounds if setup.large else args.step_rounds
    counter = iter(range(1 << 30))
    with torch.no_grad():
        step_t = interleaved(steps, rounds, device)
        switch_t = interleaved({k: (lambda f=f: f(next(counter) % len(names))) for k, f in switch_fns.items()},
                               rounds, device, warmup=4, before=switched_step)
    if args.bit_switches:  # the managers' copies started as this policy, which no manager touched
        base_state = policy.state_dict()
        for mode, mgr in ours.items():
            with torch.no_grad():
                for i in range(args.bit_switches):
                    switch_fns[mode](i % len(names))
            mgr.close()  # detaches every skill: the policy is the plain base module again
            state = mgr.policy.state_dict()
            same = all(k in state and torch.equal(state[k], v) for k, v in base_state.items())
            print(f"[{label}] {mode}: base parameters and buffers bit-identical after "
                  f"{args.bit_switches + rounds + 4:,} switches and close(): {same}")
    plain_wall, plain_cpu = (np.median(step_t["plain base"][:, c]) for c in (0, 1))
    rows = []
    for name in dict.fromkeys([*steps, *switch_fns]):
        cells = [label, name]
        if name in step_t:
            wall, cpu = step_t[name][:, 0], step_t[name][:, 1]
            cells += [f"{np.median(wall) * 1e3:.2f}", f"{np.percentile(wall, 99) * 1e3:.2f}",
                      f"{np.median(wall) / plain_wall:.3f}", f"{np.median(cpu) / plain_cpu:.3f}"]
        else:
            cells += [""] * 4
        if name in switch_t:
            wall, cpu = switch_t[name][:, 0] * 1e6, switch_t[name][:, 1] * 1e6
            cells += [f"{np.median(wall):.0f}", f"{np.percentile(wall, 99):.0f}", f"{wall.max():.0f}",
                      f"{np.percentile(cpu, 99):.0f}"]
        else:
            cells += [""] * 4
        cells.append(f"{memory[name] / MB:.2f}" if name in memory else "")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


class LimitHits(logging.Filter):
    """Counts (and silences) dynamo's "hit config.recompile_limit" warnings."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        hit = "recompile_limit" in record.getMessage()
        self.count += hit
        return not hit


def recompiles(setup: Setup, args: argparse.Namespace, device: torch.device, peft_ok: bool,
               workdir: Path) -> list[str]:
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(args.seed)
    policy = setup.build().to(device).eval()
    batch = {k: v.to(device) for k, v in probe_batch(policy).items()}
    adapters = make_adapters(policy, setup.targets, args.compile_skills, args.rank, args.seed + 1)
    names = [a.skill for a in adapters]
    cycles: dict[str, tuple[Callable[[], object], Callable[[str], None]]] = {}
    for mode in MODES:
        mgr = SkillManager(copy.deepcopy(policy), mode)
        for adapter in adapters:
            mgr.attach(adapter.skill, adapter)

        def switch(name: str, mgr: SkillManager = mgr) -> None:
            mgr.activate(name)
            mgr.apply_pending()
        cycles[mode] = (mgr.policy.predict_chunk, switch)
    if peft_ok:
        folders = [to_peft(a, workdir / "compile" / setup.label / a.skill, policy) for a in adapters]
        model = peft_model(policy, folders, names)
        cycles["PEFT set_adapter"] = (model.base_model.model.predict_chunk, model.set_adapter)
    dynamo_log = logging.getLogger("torch._dynamo.convert_frame")
    limit = torch._dynamo.config.recompile_limit
    rows = []
    for label, (fn, switch) in cycles.items():
        torch._dynamo.reset()
        counter, limit_hits = CompileCounter(), LimitHits()
        compiled = torch.compile(fn, backend=counter)
        dynamo_log.addFilter(limit_hits)  # the limit warnings are reported in the table instead
        try:
            with torch.no_grad():
                switch(names[0])
                compiled(batch)
                first = counter.frame_count  # the first call's frames (more than one where the code graph-breaks)
                for name in names[1:] + names:
                    switch(name)
                    compiled(batch)
        finally:
            dynamo_log.removeFilter(limit_hits)
        note = (f" (recompile_limit={limit} hit by {limit_hits.count} frames: eager from there on)"
                if limit_hits.count else "")
        rows.append(f"| {setup.label} | {label} | {counter.frame_count - first}{note} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS,
                        help="base, 12x512: the visuomotor policy; act: the ACT-style policy (--act-preset)")
    parser.add_argument("--act-preset", default="base", choices=["tiny", "base"], help="ACTConfig preset")
    parser.add_argument("--act-skills", type=int, default=16, help="skills attached to the ACT policy")
    parser.add_argument("--compile-skills", type=int, default=16, help="skills cycled under torch.compile")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--step-rounds", type=int, default=300, help="interleaved rounds on the base and act configs")
    parser.add_argument("--large-rounds", type=int, default=25, help="interleaved rounds on the 12x512 config")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = least noise when shared)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compile", action="store_true", help="skip the recompile count")
    parser.add_argument("--lerobot-policy", default=None,
                        help="a LeRobot ACT folder or lerobot-train output for --configs lerobot (lerobot extra)")
    parser.add_argument("--bit-switches", type=int, default=10_000,
                        help="switches before the bit-identity check of the base (0: skip)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        import peft  # noqa: F401  (a bench extra, never a robolora dependency)

        peft_ok = True
    except ImportError:
        peft_ok = False
        print("peft is not installed (pip install peft): PEFT rows are skipped")
    chosen = [setups(args)[name] for name in dict.fromkeys(args.configs)]
    start = time.perf_counter()
    rows, compile_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for setup in chosen:
            rows += bench_config(setup, args, device, peft_ok, Path(tmp))
            print(f"[{setup.label}] done after {time.perf_counter() - start:.0f} s")
        if not args.no_compile:
            for setup in (s for s in chosen if s.compile and not s.large):
                compile_rows += recompiles(setup, args, device, peft_ok, Path(tmp))
    print(f"\nbatch 1, r={args.rank}, {args.threads} thread(s), {device}; {time.perf_counter() - start:.0f} s")
    for setup in chosen:
        print(f"{setup.label}: {setup.skills} skills on {', '.join(setup.targets)}")
    print("\n| config | variant | step p50 ms | step p99 ms | x plain (wall p50) | x plain (CPU p50) "
          "| switch p50 us | switch p99 us | switch max us | switch CPU p99 us | MB per skill |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if compile_rows:
        print(f"\n| config | cycling {args.compile_skills} skills x2 under torch.compile | recompiles (frames "
              "compiled after the first call) |\n|---|---|---|")
        print("\n".join(compile_rows))


if __name__ == "__main__":
    main()
