"""Task success of blended skills: SkillManager.blend({wipe: w, dish_rack: 1 - w}) on each skill's own task.

A blend runs W0 + sum_i w_i s_i B_i A_i (and the weighted sum of skill tokens) exactly; whether the blended policy
still does either job is an empirical question, answered here on held-out seeds. Prints a markdown table.

    python scripts/bench_blend.py --episodes 50
"""

from __future__ import annotations

import argparse
import sys
import time

from robolora.envs import TASKS
from robolora.evaluate import evaluate
from robolora.policies import load_policy
from robolora.recipes import shipped_base
from robolora.skills import SkillManager


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="base checkpoint (default: the shipped base)")
    parser.add_argument("--skills", nargs=2, default=["policies/pretrained/skills/wipe",
                                                      "policies/pretrained/skills/dish_rack"],
                        metavar=("FIRST", "SECOND"), help="two adapter folders (default: the shipped ones)")
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25, 0.0],
                        help="weights w of the first skill; the second gets 1 - w (default 1 0.75 0.5 0.25 0)")
    parser.add_argument("--episodes", type=int, default=50, help="held-out episodes per task and blend")
    parser.add_argument("--mode", default="bank", choices=["bank", "inplace", "unmerged"])
    args = parser.parse_args(argv)

    manager = SkillManager(load_policy(args.base or shipped_base()), mode=args.mode)
    names = [manager.load(path).skill for path in args.skills]
    rows = []
    for w in args.weights:
        weights = {names[0]: w, names[1]: 1.0 - w}
        t0 = time.perf_counter()
        manager.blend({k: v for k, v in weights.items() if v != 0.0})
        manager.apply_pending()
        results = {task: evaluate(manager, TASKS[task], args.episodes) for task in names}
        rows.append((weights, results))
        print(f"{weights}: " + ", ".join(f"{t} {m['eval/success_rate']:.2f}" for t, m in results.items())
              + f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    print(f"\n| blend | {' | '.join(f'{t} success ({args.episodes} eps)' for t in names)} |")
    print("| --- |" + " --- |" * len(names))
    for weights, results in rows:
        label = " + ".join(f"{v:g} {k}" for k, v in weights.items() if v)
        cells = [f"{m['eval/success_rate']:.2f} [{m['eval/ci_low']:.2f}, {m['eval/ci_high']:.2f}]"
                 for m in results.values()]
        print(f"| {label} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
