"""How precisely must a policy know where the plate is? The dish_rack expert with a perception error.

The scripted expert reads the plate's true position from the simulator. A policy has to infer it from a 64 px
camera image of the whole workspace. Here the expert sees the plate displaced by a constant,
per-episode Gaussian error of std sigma in x and y (a biased estimate, as a policy's would be). It grasps the plate
off-centre by that error and aligns the wrong point over the slot. Success over N seeded episodes for each sigma
tells how good the plate estimate must be for a given success rate. Prints a markdown table.

    python scripts/expert_precision.py --sigmas 0 1 2 3 5 8 --episodes 50
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")

from robolora.envs import TASKS, make, make_expert  # noqa: E402
from robolora.stats import wilson_interval  # noqa: E402


class PerceivedPlate:
    """The env as the expert sees it: everything true except the plate's position, which is offset by ``bias``."""

    def __init__(self, env: Any, bias: np.ndarray) -> None:
        self._env = env
        self._bias = bias

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)

    def body_pos(self, name: str) -> np.ndarray:
        pos = self._env.body_pos(name)
        return pos + self._bias if name == "plate" else pos


def run(sigma_mm: float, episodes: int, seed: int) -> tuple[int, int]:
    env = make(TASKS["dish_rack"])
    wins = 0
    try:
        for i in range(episodes):
            env.reset(seed=seed + i)
            expert = make_expert(env, seed=seed + i)
            expert.reset()
            bias = np.zeros(3)
            bias[:2] = np.random.default_rng(10_000 + seed + i).normal(0.0, sigma_mm / 1000.0, size=2)
            expert.env = PerceivedPlate(env.unwrapped, bias)
            done, success = False, False
            while not done:
                action = expert.perturb(expert.act(), expert.default_noise)
                _, _, terminated, truncated, info = env.step(action)
                success |= bool(info["success"])
                done = terminated or truncated
            wins += success
    finally:
        env.close()
    return wins, episodes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0, 1, 2, 3, 5, 8],
                        help="std of the per-episode plate position error, mm (default 0 1 2 3 5 8)")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=10_000_000, help="first episode seed (default: held-out range)")
    args = parser.parse_args(argv)
    print("| plate position error (std per axis) | expert success | 95% interval |")
    print("| --- | --- | --- |")
    for sigma in args.sigmas:
        wins, n = run(sigma, args.episodes, args.seed)
        low, high = wilson_interval(wins, n)
        print(f"| {sigma:g} mm | {wins / n:.2f} | [{low:.2f}, {high:.2f}] |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
