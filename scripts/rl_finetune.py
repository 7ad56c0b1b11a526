"""RL fine-tuning experiment (issue 9): a behaviour-cloned skill adapter before and after PPO on its LoRA weights.

Usage:
    python scripts/rl_finetune.py --skill runs/dish_rack_bc10 --steps 100000 --episodes 50 --out runs/dish_rack_rl
    python scripts/rl_finetune.py --base runs/base/policy --skill runs/x/adapter --steps 2000 --episodes 10 \\
        --n-envs 2 --n-steps 32                                             # a smoke run

Evaluates the adapter on held-out seeds (EVAL_SEED, EVAL_SEED + 1, ...), fine-tunes it with
``robolora.rl.finetune_rl`` (the base stays frozen), evaluates the result on the same seeds, prints a table with
95% Wilson intervals and the compute used, and writes ``OUT/rl_result.json``; the adapter goes to ``OUT/adapter``.
Every field of ``RLConfig`` is a flag (``--actor-lr``, ``--init-std``, ``--shaped-weight``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")

import torch  # noqa: E402

from robolora.atomic import write_json  # noqa: E402
from robolora.rl import RLConfig, finetune_rl  # noqa: E402
from robolora.stats import EVAL_SEED  # noqa: E402


def _optional(kind: type) -> Any:
    return lambda text: None if text.lower() == "none" else kind(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skill", type=Path, required=True, help="BC skill adapter folder (or a run folder with adapter/)")
    p.add_argument("--base", type=Path, default=None, help="base policy checkpoint (default: the shipped base)")
    p.add_argument("--steps", type=int, required=True, help="env steps of RL (rounded up to whole PPO rollouts)")
    p.add_argument("--out", type=Path, required=True, help="run folder: adapter/ and rl_result.json")
    p.add_argument("--episodes", type=int, default=50, help="held-out evaluation episodes before and after")
    p.add_argument("--eval-seed", type=int, default=EVAL_SEED, help=f"first evaluation seed (default {EVAL_SEED})")
    p.add_argument("--env", default=None, help="gym id to train and evaluate on (default: the skill's task)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default torch's); 1 made batch-1 rollouts 10x faster on a busy "
                        "2-core machine")
    for field in dataclasses.fields(RLConfig):
        flag, help = "--" + field.name.replace("_", "-"), f"{field.metadata['help']} (default {field.default})"
        if isinstance(field.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help)
        else:
            kind = type(field.default) if field.default is not None else int
            kind = _optional(kind) if "None" in str(field.type) else kind
            p.add_argument(flag, type=kind, default=field.default, help=help)
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error(f"--episodes {args.episodes}: the experiment evaluates before and after, use >= 1")
    return args


def table(result: dict[str, Any]) -> str:
    rows = ["| adapter | success | 95% CI | mean length | episodes |", "|---|---|---|---|---|"]
    for name, key in (("BC (before RL)", "before"), ("BC + PPO (after RL)", "after")):
        m = result[key]
        rows.append(f"| {name} | {m['eval/success_rate']:.2f} | [{m['eval/ci_low']:.2f}, {m['eval/ci_high']:.2f}] | "
                    f"{m['eval/mean_length']:.1f} | {m['eval/episodes']} |")
    per_step = 1e3 * result["rl/wall_s"] / max(result["rl/env_steps"], 1)
    rows += ["", f"RL compute: {result['rl/wall_s']:.0f} s wall, {result['rl/env_steps']:.0f} env steps "
             f"({per_step:.1f} ms/step), {result['rl/episodes']:.0f} episodes (success while exploring "
             f"{result['rl/train_success_rate']:.2f}), {result.get('rl/n_updates', 0):.0f} PPO epochs, "
             f"{result['trainable_params']} trainable LoRA parameters, execution horizon {result['execution_horizon']}",
             f"Evaluation: {result['before']['eval/wall_s']:.0f} s + {result['after']['eval/wall_s']:.0f} s wall; "
             f"adapter: {result['out']}"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = RLConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RLConfig)})
    skill = args.skill / "adapter" if (args.skill / "adapter" / "adapter.json").exists() else args.skill
    result = finetune_rl(skill, args.steps, args.out, base=args.base, config=config, env_id=args.env,
                         eval_episodes=args.episodes, eval_seed=args.eval_seed,
                         progress=lambda n, m: logging.info("RL %d env steps: %s", n, m))
    print(table(result))
    write_json(args.out / "rl_result.json", {"argv": sys.argv[1:] if argv is None else argv, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
