"""The skill table: LoRA vs full fine-tuning vs scratch vs the frozen base, per skill and demo budget.

Usage:
    python scripts/skill_table.py --work runs/skill_table                       # every cell (hours on 2 CPU cores)
    python scripts/skill_table.py --work runs/skill_table --skills dish_rack --demos 50 --methods lora_r4 full
    python scripts/skill_table.py --work runs/skill_table --noise 0.05 --select-episodes 20 --demos 50
    python scripts/skill_table.py --work runs/skill_table --report-only         # rewrite the table from done cells
    python scripts/skill_table.py --work runs/skill_table --import dish_rack-200-full=RUN/policy   # trained elsewhere

Each cell (skill, demo budget, method, how the demos were recorded) trains with `robolora.recipes.train_skill` on
the first N demos recorded with that expert action noise (default: the expert's), evaluates on 50 held-out
episodes and stores its result as ``<cells>/<skill>-<demos>-<method>-noise<sigma>[q].json`` (q: recorded with the
expert's quiet phases; ``-teM`` appended for cells executed with temporal ensembling m=M;
``docs/skill_table_cells``, committed, by default). Finished cells are skipped, so the table
can be filled over several runs. Demos and runs go under ``--work``. The table goes to ``docs/skill_table.md`` and
the plot to
``docs/skill_table.png``; cells of the issue's budgets (10, 25, 50 demos) not run yet show as "not run", larger
budgets only when run. ``--import CELL=ARTIFACT`` adds a cell trained elsewhere (e.g. on a GPU machine with
``robolora train-skill``): it reads the adapter or policy folder's metadata, evaluates it here on the same held-out
episodes and writes the cell.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")

from robolora.atomic import write_json  # noqa: E402
from robolora.config import LoRAConfig  # noqa: E402
from robolora.data import collect  # noqa: E402
from robolora.envs import SKILL_TASKS, TASKS, make, make_expert  # noqa: E402
from robolora.evaluate import evaluate  # noqa: E402
from robolora.policies import load_policy  # noqa: E402
from robolora.recipes import shipped_base, train_skill  # noqa: E402
from robolora.train import TrainConfig  # noqa: E402

ATTN = ("attn.q", "attn.k", "attn.v", "attn.o")
ALL = ATTN + ("mlp.fc1", "mlp.fc2", "action_head", "proprio_proj")
METHODS = {  # name -> (recipe method, LoRA rank, learning rate, LoRA targets)
    "lora_r2": ("lora", 2, 1e-3, ATTN),
    "lora_r4": ("lora", 4, 1e-3, ATTN),
    "lora_r2_mlp": ("lora", 2, 2e-3, ATTN + ("mlp.fc1", "mlp.fc2")),
    "lora_r2_all": ("lora", 2, 2e-3, ALL),
    "lora_r4_all": ("lora", 4, 2e-3, ALL),
    "lora_r4_mlp_only": ("lora", 4, 2e-3, ("mlp.fc1", "mlp.fc2")),
    "full": ("full", None, 3e-4, None),
    "scratch": ("scratch", None, 5e-4, None),
    "frozen": (None, None, None, None),
}
BUDGETS = (10, 25, 50)
EXTRA = ("lora_r4_all", "lora_r4_mlp_only")  # not in a default run (asked for with --methods or imported)


def expert_recording(skill: str) -> tuple[float, bool]:
    """How ``robolora collect`` records the skill's demos today: (default action noise, whether some phases are
    executed without noise, see ``Expert.quiet_phases``)."""
    env = make(skill)
    try:
        expert = make_expert(env)
        return float(expert.default_noise), bool(expert.quiet_phases)
    finally:
        env.close()


def tag(noise: float, quiet: bool) -> str:
    return f"noise{noise:g}" + ("q" if quiet else "")


def data_dir(work: Path, skill: str, noise: float, quiet: bool) -> Path:
    return work / "data" / f"{skill}-{tag(noise, quiet)}"


def cell_name(skill: str, demos: int, method: str, noise: float, quiet: bool, te: float | None = None) -> str:
    """The cell's file stem; ``te``: the policy executes with temporal ensembling of that coefficient."""
    return f"{skill}-{demos}-{method}-{tag(noise, quiet)}" + ("" if te is None else f"-te{te:g}")


def execution_args(n_action_steps: int | None, te: float | None) -> dict | None:
    """The ``execution`` a cell trains and evaluates with (None: the base's)."""
    if te is not None:
        return {"n_action_steps": 1, "temporal_ensemble": te}
    return {"n_action_steps": n_action_steps} if n_action_steps else None


def run_cell(work: Path, base: Path, skill: str, demos: int, method: str, noise: float, quiet: bool, steps: int,
             episodes: int, n_action_steps: int | None = None, select_episodes: int = 0,
             te: float | None = None) -> dict:
    recipe, rank, lr, targets = METHODS[method]
    data = data_dir(work, skill, noise, quiet)
    execution = execution_args(n_action_steps, te)
    if recipe is None:  # the frozen base as it ships: no training, task id 0 (it has no id for the skill)
        t0 = time.perf_counter()
        policy = load_policy(base)
        if execution:
            policy.set_execution(**execution)
        m = evaluate(policy, TASKS[skill], episodes, task_id=0)
        return {"eval": {k: v for k, v in m.items() if k != "episodes"}, "trainable_params": 0,
                "trainable_percent_of_base": 0.0, "size_bytes": 0, "train_metrics": {"train/wall_s": 0.0},
                "eval_wall_s": time.perf_counter() - t0}
    config = TrainConfig(steps=steps, batch_size=64, lr=lr, weight_decay=0.0, warmup_steps=min(100, steps // 10),
                         checkpoint_every=250, eval_every=max(1, steps // 6) if select_episodes else 0)
    lora = LoRAConfig(rank=rank or 4, alpha=2.0 * (rank or 4), targets=targets or ATTN)
    return train_skill(base, data, work / "runs" / cell_name(skill, demos, method, noise, quiet, te), method=recipe,
                       lora=lora, config=config, demos=demos, resume=True, eval_episodes=episodes,
                       select_episodes=select_episodes, execution=execution)


def cell_te(cell: dict) -> float | None:
    """The temporal-ensembling coefficient a finished cell's policy executed with (None: open-loop chunks)."""
    te = (cell.get("execution") or {}).get("temporal_ensemble")
    return None if te is None else float(te)


def save_cell(cells: Path, skill: str, demos: int, method: str, noise: float, quiet: bool, cell: dict) -> Path:
    """Store a finished cell as ``<cells>/<name>.json`` (atomically: a killed run leaves no half cell)."""
    te = cell_te(cell)
    path = cells / f"{cell_name(skill, demos, method, noise, quiet, te)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {**cell, "table": {"skill": skill, "demos": demos, "method": method, "noise": noise,
                                        "quiet": quiet, "te": te}})
    return path


def import_cell(cells: Path, base: Path, spec: str, episodes: int, noise: float | None,
                quiet: bool | None) -> tuple[Path, dict]:
    """Evaluate an adapter (on ``base``) or a policy folder trained elsewhere as the cell ``SKILL-DEMOS-METHOD``.

    How its demos were recorded: the artifact's ``data_noise`` / ``data_quiet_phases``, else ``noise`` / ``quiet``,
    else the expert's defaults today."""
    from robolora.adapters import attach_for_eval
    from robolora.policies.checkpoint import read_policy_header

    name, sep, artifact = spec.partition("=")
    parts = name.rsplit("-", 2) if sep else []
    if len(parts) != 3 or parts[0] not in SKILL_TASKS or parts[2] not in METHODS or not parts[1].isdigit():
        raise SystemExit(f"--import {spec!r}: expected SKILL-DEMOS-METHOD=FOLDER with SKILL in {list(SKILL_TASKS)}, "
                         f"METHOD in {list(METHODS)}, e.g. dish_rack-200-full=runs/x/policy")
    skill, demos, method = parts[0], int(parts[1]), parts[2]
    folder = Path(artifact)
    t0 = time.perf_counter()
    if (folder / "adapter.json").exists():
        info = json.loads((folder / "adapter.json").read_text())
        policy = load_policy(base)
        attach_for_eval(policy, folder)
        size = (folder / "adapter.safetensors").stat().st_size
    elif (folder / "config.json").exists():
        info = read_policy_header(folder).get("metadata", {})
        policy = load_policy(folder)
        if policy.config.temporal_ensemble is not None:  # a policy's execution lives in its config
            info = {**info, "execution": {"n_action_steps": 1, "temporal_ensemble": policy.config.temporal_ensemble}}
        size = (folder / "model.safetensors").stat().st_size
    else:
        raise SystemExit(f"--import {spec!r}: {folder} holds neither adapter.json nor config.json")
    expect = METHODS[method][0]
    if (info.get("skill"), info.get("demos"), info.get("method")) != (skill, demos, expect):
        raise SystemExit(f"--import {spec!r}: {folder} was trained as skill={info.get('skill')!r}, "
                         f"demos={info.get('demos')}, method={info.get('method')!r}; the cell name says "
                         f"{skill!r}, {demos}, {expect!r}")
    if expect == "lora":
        lora, (_, rank, _, targets) = info.get("lora", {}), METHODS[method]
        if (lora.get("rank"), set(lora.get("targets", ()))) != (rank, set(targets)):
            raise SystemExit(f"--import {spec!r}: the adapter has rank {lora.get('rank')} on {lora.get('targets')}; "
                             f"{method} means rank {rank} on {list(targets)}")
    recorded = info.get("data_noise")
    if recorded is not None and noise is not None and float(recorded) != noise:
        raise SystemExit(f"--import {spec!r}: {folder} was trained on demos with noise {recorded}, not --noise {noise}")
    default = expert_recording(skill)
    noise = float(recorded) if recorded is not None else noise if noise is not None else default[0]
    recorded_quiet = info.get("data_quiet_phases")  # None: datasets from before quiet phases were recorded
    if recorded_quiet is not None and quiet is not None and bool(recorded_quiet) != quiet:
        raise SystemExit(f"--import {spec!r}: {folder}'s demos were recorded with quiet phases {recorded_quiet}; "
                         f"drop --{'' if quiet else 'no-'}quiet")
    quiet = bool(recorded_quiet) if recorded_quiet is not None else default[1] if quiet is None else quiet
    m = evaluate(policy, TASKS[skill], episodes)
    cell = {k: v for k, v in info.items() if k not in ("lora", "layers", "eval", "format", "format_version")}
    cell.update(eval={k: v for k, v in m.items() if k != "episodes"}, size_bytes=size, out=str(folder),
                imported=True, eval_wall_s=time.perf_counter() - t0)
    return save_cell(cells, skill, demos, method, noise, quiet, cell), cell


def _where(cell: dict) -> str:
    """' (GPU)' for a cell trained on CUDA: its training time is not comparable with the CPU cells'."""
    return " (GPU)" if str(cell.get("train_config", {}).get("device", "")).startswith("cuda") else ""


def _steps(cell: dict) -> str:
    """The training steps, and which step was kept when the checkpoint was chosen on validation episodes."""
    steps = cell.get("train_config", {}).get("steps")
    chosen = cell.get("selection")
    return "-" if steps is None else f"{steps} (best: {chosen['step']})" if chosen else str(steps)


def _recording(recording: tuple[float, bool]) -> str:
    noise, quiet = recording
    return f"noise {noise:g}" + (", clean alignment" if quiet else "")


def _execution(te: float | None) -> str:
    return "chunks" if te is None else f"ensembled, m={te:g}"


def write_report(cells: Path, out_md: Path, out_png: Path, command: str) -> None:
    done = {}
    for path in sorted(cells.glob("*.json")):
        cell = json.loads(path.read_text())
        t = cell["table"]
        te = t.get("te")
        done[(t["skill"], t["demos"], t["method"], (float(t["noise"]), bool(t.get("quiet", False))), te)] = cell
    budgets = sorted(set(BUDGETS) | {demos for _, demos, _, _, _ in done})
    today = {skill: expert_recording(skill) for skill in SKILL_TASKS}  # each builds a MuJoCo env: once per skill
    rows: list[dict[str, Any]] = []
    for skill in SKILL_TASKS:
        default = today[skill]
        recordings = sorted({r for s, _, _, r, _ in done if s == skill} | {default}, key=lambda r: (not r[1], -r[0]))
        executions = sorted({te for s, _, _, _, te in done if s == skill} | {None}, key=lambda te: te is not None)
        for recording in recordings:
            for demos in budgets:
                for method in METHODS:
                    for te in executions:
                        cell = done.get((skill, demos, method, recording, te))
                        # not-run rows only where the issue asks: its budgets, default methods and execution, demos
                        # as recorded today
                        if cell is not None or (demos in BUDGETS and method not in EXTRA and recording == default
                                                and te is None):
                            rows.append({"skill": skill, "demos": demos, "method": method, "noise": recording,
                                         "te": te, "cell": cell})
    lines = ["| skill | demos recorded with | demos | method | execution | success (50 eps) | 95% interval |"
             " trainable params (% of base) | file size | steps | training time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        c = r["cell"]
        head = f"| {r['skill']} | {_recording(r['noise'])} | {r['demos']} | {r['method']} | {_execution(r['te'])} |"
        if c is None:
            lines.append(f"{head} not run | | | | | |")
            continue
        e = c["eval"]
        size = f"{c['size_bytes'] / 1024:.0f} KB" if c["size_bytes"] else "-"
        lines.append(f"{head} {e['eval/success_rate']:.2f} | [{e['eval/ci_low']:.2f}, {e['eval/ci_high']:.2f}] | "
                     f"{c['trainable_params']:,} ({c['trainable_percent_of_base']:.2f}%) | {size} | {_steps(c)} | "
                     f"{c['train_metrics']['train/wall_s']:.0f} s{_where(c)} |")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    caveat = ("Each trained cell: the listed steps of batch 64 on the first N demos (seeds from 0) recorded with "
              "the given expert action noise (std, in action units; DART: clean labels, noisy execution; 'clean "
              "alignment': the dish_rack expert's align/insert/release phases executed without noise, its "
              "default since this table's noise column was added), "
              "evaluated on 50 held-out seeds (from 10,000,000). Execution 'chunks': --n-action-steps actions of "
              "each predicted chunk, open loop, then a new query (the base's 4 when not given); 'ensembled, m=M': "
              "ACT temporal ensembling, a query every step and the action averaged over every chunk that predicted "
              "it, with weights exp(-M*i) from the oldest. Frozen = the base with task id 0. 'best: S' = the step "
              "kept after rollouts on validation seeds (from 30,000,000) every steps/6 steps (cells trained "
              "elsewhere: every 500 or 1000). Ensembled cells trained for chunks of 8 had their execution switched "
              "afterwards, so their 'best' step was chosen executing chunks (docs/results.md 'Temporal ensembling'). "
              "Training time is wall-clock "
              "on the shared 2-core machine with up to four jobs running at once, so it measures the run, not the "
              "method; (GPU) marks a cell trained with the same recipe on one NVIDIA H200 with bf16 autocast, several jobs "
              "sharing it, and evaluated on the CPU.")
    out_md.write_text("# Skill table\n\n" + "\n".join(lines) + f"\n\n{caveat}\n\nCommand: `{command}`\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SKILL_TASKS), figsize=(6 * len(SKILL_TASKS), 6), sharey=True)
    for ax, skill in zip(axes, SKILL_TASKS):
        series = sorted({(r["noise"], r["te"]) for r in rows if r["skill"] == skill and r["cell"]},
                        key=lambda k: (k[0][1], -k[0][0], k[1] is not None))
        for i, method in enumerate(METHODS):
            for noise, te in series:  # one colour per method; solid = demos as recorded today, dashed = older
                pts = [(r["demos"], r["cell"]["eval"]) for r in rows if r["skill"] == skill and r["method"] == method
                       and r["noise"] == noise and r["te"] == te and r["cell"]]
                if not pts:
                    continue
                x = [d * 1.04 ** (i - len(METHODS) / 2) for d, _ in pts]  # side by side on the log axis
                y = [e["eval/success_rate"] for _, e in pts]
                err = [[v - e["eval/ci_low"] for v, (_, e) in zip(y, pts)],
                       [e["eval/ci_high"] - v for v, (_, e) in zip(y, pts)]]
                current = noise == today[skill]
                label = f"{method}, {_recording(noise)}" + ("" if te is None else f", {_execution(te)}")
                ax.errorbar(x, y, yerr=err, marker="s" if te is not None else "o", capsize=3, label=label,
                            color=f"C{i}", linestyle="-" if current else "--", alpha=1.0 if current else 0.6)
        ax.set_title(skill)
        ax.set_xlabel("demos")
        ax.set_xscale("log")
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlim(min(budgets) * 0.8, max(budgets) * 1.25)  # the per-method offsets stay inside the axes
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("success rate (50 held-out episodes, 95% CI)")
    for ax in axes:  # below the axes: a legend inside would hide points
        if ax.get_legend_handles_labels()[0]:  # a skill with no finished cell has nothing to list
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120, bbox_inches="tight")  # the legends below the axes stay in the picture
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for demos and training runs")
    parser.add_argument("--cells", type=Path, default=Path("docs/skill_table_cells"),
                        help="folder of finished cells, one JSON each (default docs/skill_table_cells, committed)")
    parser.add_argument("--base", type=Path, default=None, help="base checkpoint (default: the shipped base)")
    parser.add_argument("--skills", nargs="+", default=list(SKILL_TASKS))
    parser.add_argument("--demos", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if m not in EXTRA], choices=list(METHODS),
                        help=f"default: all but {', '.join(EXTRA)}")
    parser.add_argument("--noise", type=float, default=None,
                        help="expert action noise of the demos (default: each skill expert's)")
    parser.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=None,
                        help="with --import: whether the artifact's demos were recorded with the expert's quiet "
                             "phases (default: what it recorded, else today's expert)")
    parser.add_argument("--steps", type=int, default=3000, help="training steps per cell (default 3000)")
    parser.add_argument("--n-action-steps", type=int, default=None,
                        help="chunk execution of every cell's policy (default: the base's)")
    parser.add_argument("--temporal-ensemble", type=float, default=None, metavar="M",
                        help="cells execute with ACT temporal ensembling m=M instead of --n-action-steps chunks "
                             "(their own cells: -teM in the file name)")
    parser.add_argument("--select-episodes", type=int, default=0,
                        help="keep the best of 6 checkpoints on N validation episodes (default 0: the last)")
    parser.add_argument("--episodes", type=int, default=50, help="held-out evaluation episodes (default 50)")
    parser.add_argument("--md", type=Path, default=Path("docs/skill_table.md"))
    parser.add_argument("--png", type=Path, default=Path("docs/skill_table.png"))
    parser.add_argument("--report-only", action="store_true", help="only rewrite the table from finished cells")
    parser.add_argument("--import", dest="imports", nargs="+", default=[], metavar="CELL=FOLDER",
                        help="evaluate adapter/policy folders trained elsewhere as cells, e.g. "
                             "wipe-200-lora_r2_all=RUN/adapter (then rewrite the table)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    base = args.base or shipped_base()
    command = f"python scripts/skill_table.py --work {args.work} --steps {args.steps}" + (
        f" --n-action-steps {args.n_action_steps}" if args.n_action_steps else "") + (
        f" --temporal-ensemble {args.temporal_ensemble:g}" if args.temporal_ensemble is not None else "")
    for spec in args.imports:
        path, cell = import_cell(args.cells, base, spec, args.episodes, args.noise, args.quiet)
        print(f"imported {path.stem}: success {cell['eval']['eval/success_rate']:.2f}", flush=True)
    if not args.report_only and not args.imports:
        for skill in args.skills:
            noise, quiet = expert_recording(skill)
            noise = noise if args.noise is None else args.noise
            collect(TASKS[skill], max(args.demos), data_dir(args.work, skill, noise, quiet), seed=0, noise=noise,
                    workers=2)
            for demos in args.demos:
                for method in args.methods:
                    te = args.temporal_ensemble
                    if (args.cells / f"{cell_name(skill, demos, method, noise, quiet, te)}.json").exists():
                        continue
                    result = run_cell(args.work, base, skill, demos, method, noise, quiet, args.steps, args.episodes,
                                      args.n_action_steps, args.select_episodes, te)
                    save_cell(args.cells, skill, demos, method, noise, quiet, result)
                    print(f"{skill} {demos} demos {method} noise {noise:g}: success "
                          f"{result['eval']['eval/success_rate']:.2f}", flush=True)
                    write_report(args.cells, args.md, args.png, command)
    write_report(args.cells, args.md, args.png, command)
    print(args.md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
