"""Reproduce the shipped base policy from nothing: collect demos, pretrain, evaluate, write the results table.

Usage:
    python scripts/pretrain_base.py --work runs/base_repro --episodes 200 --steps 16000      # ~1 h on 2 CPU cores
    python scripts/pretrain_base.py --work runs/base_repro --resume                           # continue after a kill
    python scripts/pretrain_base.py --work runs/base_repro --ship policies/pretrained/base     # copy the result

Every stage resumes: collection keeps finished episodes, training continues from its last checkpoint,
evaluation is re-run. The table (50 held-out episodes per task, 95% Wilson intervals) goes to
``<work>/results.md`` and, with ``--ship``, next to the shipped checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

from robolora.cli import task_weight_arg  # noqa: E402
from robolora.data import collect  # noqa: E402
from robolora.envs import BASE_TASKS, SKILL_TASKS, TASKS  # noqa: E402
from robolora.evaluate import evaluate  # noqa: E402
from robolora.policies import load_policy  # noqa: E402
from robolora.recipes import POLICY_DIR, pretrain  # noqa: E402
from robolora.train import TrainConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for data, run and results")
    parser.add_argument("--episodes", type=int, default=200, help="demos per base task (default 200)")
    parser.add_argument("--task-episodes", nargs="*", default=[], metavar="TASK=N",
                        help="per-task demo counts overriding --episodes, e.g. reach=1000 push=800")
    parser.add_argument("--task-weight", nargs="*", type=task_weight_arg, default=[], metavar="TASK=W",
                        help="sample TASK W times as often as the other tasks, e.g. push=2 (default: all equally)")
    parser.add_argument("--steps", type=int, default=16_000, help="training steps (default 16000)")
    parser.add_argument("--init", type=Path, default=None,
                        help="continue pretraining from this saved policy (same config) instead of a fresh one")
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--augment-shift", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="collection processes (default 2)")
    parser.add_argument("--eval-episodes", type=int, default=50, help="held-out episodes per task (default 50)")
    parser.add_argument("--num-envs", type=int, default=2, help="parallel envs in evaluation (default 2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resume", action="store_true", help="continue the training run in --work")
    parser.add_argument("--skip-train", action="store_true", help="only (re-)evaluate the trained policy")
    parser.add_argument("--ship", type=Path, default=None, help="copy the policy and results table here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    counts = {task: args.episodes for task in BASE_TASKS}
    for item in args.task_episodes:
        task, _, n = item.partition("=")
        if task not in counts or not n.isdigit():
            parser.error(f"--task-episodes {item!r}: expected TASK=N with TASK one of {list(BASE_TASKS)}")
        counts[task] = int(n)
    weights = dict(args.task_weight)
    if set(weights) - set(BASE_TASKS):
        parser.error(f"--task-weight {sorted(set(weights) - set(BASE_TASKS))}: TASK must be one of {list(BASE_TASKS)}")
    data_dirs = []
    for task in BASE_TASKS:
        out = args.work / "data" / task
        t0 = time.perf_counter()
        manifest = collect(TASKS[task], counts[task], out, seed=0, workers=args.workers)
        print(f"collected {task}: {len(manifest['episodes'])} episodes, expert success "
              f"{manifest['success_rate']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        data_dirs.append(out)

    run = args.work / "run"
    if not args.skip_train:
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             device=args.device, augment_shift=args.augment_shift, checkpoint_every=250,
                             warmup_steps=args.warmup_steps)
        metrics = pretrain(data_dirs, run, preset="base", config=config, resume=args.resume, init_from=args.init,
                           task_weights=weights or None)
        print(f"pretrained: loss {metrics['train/loss']:.4f}, {metrics['train/wall_s']:.0f} s", flush=True)

    policy = load_policy(run / POLICY_DIR)
    meta = json.loads((run / POLICY_DIR / "config.json").read_text()).get("metadata", {})
    rows = []
    for task in (*BASE_TASKS, *SKILL_TASKS):
        task_id = BASE_TASKS.index(task) if task in BASE_TASKS else 0  # skills: the base has no id; try id 0
        m = evaluate(policy, TASKS[task], args.eval_episodes, num_envs=args.num_envs, task_id=task_id)
        rows.append((task, m))
        print(f"{task:13s} success {m['eval/success_rate']:.2f} [{m['eval/ci_low']:.2f}, {m['eval/ci_high']:.2f}]"
              f" mean length {m['eval/mean_length']:.1f}", flush=True)
    lines = ["| task | group | success | 95% interval | mean length | policy step p50 / p99 (ms) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for task, m in rows:
        group = "base" if task in BASE_TASKS else "skill (task id 0)"
        lines.append(f"| {task} | {group} | {m['eval/success_rate']:.2f} | [{m['eval/ci_low']:.2f}, "
                     f"{m['eval/ci_high']:.2f}] | {m['eval/mean_length']:.1f} | {m['eval/latency_ms_p50']:.2f} / "
                     f"{m['eval/latency_ms_p99']:.2f} |")
    train_metrics = meta.get("train_metrics", {})
    demos = ", ".join(f"{t} {n}" for t, n in counts.items())
    start = f"continued from {args.init}" if args.init else "trained from scratch"
    words, skip = [], False
    for word in argv if argv is not None else sys.argv[1:]:
        if skip or word in ("--resume", "--skip-train", "--ship"):
            skip = word == "--ship"
            continue
        words.append(word)
    command = " ".join(["python scripts/pretrain_base.py", *words])
    table = "\n".join(lines) + (
        f"\n\n{args.eval_episodes} held-out episodes per task (seeds from 10,000,000), training seed {args.seed}; "
        f"demos per task: {demos}; {args.steps} steps of batch {args.batch_size}, lr {args.lr}, random shift "
        f"{args.augment_shift} px, {start}; training wall time "
        f"{train_metrics.get('train/wall_s', float('nan')):.0f} s (this run).\n"
        f"Command: {command}\n")
    (args.work / "results.md").write_text(table)
    print(table)
    if args.ship:
        args.ship.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "config.json"):
            shutil.copy2(run / POLICY_DIR / name, args.ship / name)
        (args.ship / "results.md").write_text(table)
        print(f"shipped to {args.ship}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
