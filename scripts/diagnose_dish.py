"""Where does a dish_rack policy fail? Rolls it out and sorts every episode into the first stage it did not reach.

Stages, from the simulator's state: the plate grasped; lifted (its centre 5 cm above its start); brought over the
lit slot (within 2 cm across and 3 cm along, at any height); inside the lit slot upright at some step; success
(inside, upright, released). Prints one markdown row per policy, then a second table of where the policy holds
the plate over the rack: per lit slot, the median across-slot offset (x, mm) of the plate centre from the slot centre
while the plate is held at hover height (centre 8.5-12.5 cm up) within 4 cm of the slot. The slot is 20 mm wide
and the plate 12 mm thick, so an offset beyond about 4 mm lands the plate on a wall. Positive is past the slot in
the direction the plate is carried (from the holder on the left); the episode's median includes the hover time
before a successful insertion, so it tells how far off the policy dwells, not whether it fails.

    python scripts/diagnose_dish.py --skill policies/pretrained/skills/dish_rack --episodes 50
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")

from robolora.adapters import attach_for_eval  # noqa: E402
from robolora.envs import TASKS  # noqa: E402
from robolora.evaluate import _make_envs  # noqa: E402
from robolora.policies import load_policy  # noqa: E402
from robolora.recipes import shipped_base  # noqa: E402
from robolora.stats import EVAL_SEED  # noqa: E402

STAGES = ("no grasp", "grasped, not lifted", "lifted, never over the lit slot", "over the slot, never inside",
          "inside, not released upright", "success")


def episode_stage(policy, envs, seed: int) -> tuple[str, int, float]:
    """The first stage not reached, the lit slot, and the median hover offset across the slot (mm; nan if never)."""
    obs, _ = envs.reset(seed=[seed])
    policy.reset()
    env = envs.envs[0].unwrapped
    start_z = float(env.body_pos("plate")[2])
    reached = 0
    hover: list[float] = []
    done = False
    while not done:
        obs, _, terminated, truncated, info = envs.step(np.asarray(policy.select_action(obs), dtype=np.float32))
        plate, held = env.body_pos("plate"), env.grasped("plate")
        offset = plate - env.slot_pos
        if held and 0.085 < plate[2] < 0.125 and np.all(np.abs(offset[:2]) < 0.04):
            hover.append(1000.0 * float(offset[0]))
        flags = [held, float(plate[2]) > start_z + 0.05,
                 abs(offset[0]) < 0.02 and abs(offset[1]) < 0.03, env.plate_in_slot(), bool(info["success"][0])]
        while reached < len(flags) and flags[reached]:
            reached += 1
        done = bool(terminated[0] or truncated[0]) or reached == len(flags)
    return STAGES[reached], env.target_slot, float(np.median(hover)) if hover else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=None, help="policy checkpoint (default: the shipped base)")
    parser.add_argument("--skill", nargs="*", default=[], help="adapter folders (one row each)")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    args = parser.parse_args(argv)
    print("| policy | " + " | ".join(STAGES) + " |")
    print("| --- |" + " --- |" * len(STAGES))
    offsets = {}
    for skill in args.skill or [None]:
        policy = load_policy(args.policy or shipped_base())
        if skill is not None:
            attach_for_eval(policy, skill)
        envs = _make_envs(TASKS["dish_rack"], 1, {})
        try:
            results = [episode_stage(policy, envs, args.seed + i) for i in range(args.episodes)]
        finally:
            envs.close()
        counts = Counter(stage for stage, _, _ in results)
        name = str(skill or args.policy or "base")
        offsets[name] = results
        print(f"| {name} | " + " | ".join(str(counts[s]) for s in STAGES) + " |", flush=True)
    print("\n| policy | lit slot | episodes at hover | median offset across the slot (mm) | share beyond 4 mm |")
    print("| --- | --- | --- | --- | --- |")
    for name, results in offsets.items():
        for slot in sorted({slot for _, slot, _ in results}):
            x = np.array([off for _, s, off in results if s == slot and not np.isnan(off)])
            if len(x):
                print(f"| {name} | {slot} | {len(x)} | {np.median(x):+.1f} | {np.mean(np.abs(x) > 4):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
