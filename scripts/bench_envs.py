"""Benchmark the task suite: env-step cost split into physics and rendering, expert success, demos per second.

Usage:
    python scripts/bench_envs.py                                   # every available task, 20 episodes each
    python scripts/bench_envs.py --tasks push wipe --episodes 50 --noise 0.2 --cameras front wrist

For each task the scripted expert (docs/design.md §8.5) runs ``--episodes`` seeded episodes with DART
noise. ``step ms`` is the whole ``env.step`` (physics, reward, observation rendering); ``render ms`` re-renders the
same observation after each step to time the cameras alone; ``physics ms`` is their difference. ``demos/s`` counts
only expert + env.step time on one core (the re-render is excluded).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402

from robolora.envs import TASKS, get_spec, make, make_expert  # noqa: E402


def bench_task(task: str, episodes: int, noise: float | None, image_size: int, cameras: tuple[str, ...]) -> dict:
    env = make(task, image_size=image_size, cameras=cameras)
    base = env.unwrapped
    step_s, render_s, run_s = [], [], 0.0
    successes, lengths = [], []
    for seed in range(episodes):
        t_start = time.perf_counter()
        env.reset(seed=seed)
        expert = make_expert(env, seed=seed)
        expert.reset()
        sigma = expert.default_noise if noise is None else noise
        run_s += time.perf_counter() - t_start
        done, info, length = False, {}, 0
        while not done:
            t0 = time.perf_counter()
            action = expert.perturb(expert.act(), sigma)
            t1 = time.perf_counter()
            _, _, terminated, truncated, info = env.step(action)
            t2 = time.perf_counter()
            base._get_obs()
            render_s.append(time.perf_counter() - t2)
            step_s.append(t2 - t1)
            run_s += t2 - t0
            done, length = terminated or truncated, length + 1
        successes.append(bool(info["success"]))
        lengths.append(length)
    env.close()
    step_ms, render_ms = 1e3 * float(np.mean(step_s)), 1e3 * float(np.mean(render_s))
    return {
        "success": float(np.mean(successes)),
        "length": float(np.mean(lengths)),
        "step_ms": step_ms,
        "render_ms": render_ms,
        "physics_ms": step_ms - render_ms,
        "demos_per_s": episodes / run_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=None, help="task names (default: every available task)")
    parser.add_argument("--episodes", type=int, default=20, help="expert episodes per task (default 20)")
    parser.add_argument("--noise", type=float, default=None, help="DART noise std (default: the expert's)")
    parser.add_argument("--image-size", type=int, default=64, help="observation size in pixels (default 64)")
    parser.add_argument("--cameras", nargs="+", default=["front"], help="cameras to render (front, wrist)")
    args = parser.parse_args(argv)
    tasks = args.tasks or [
        t for t in TASKS if importlib.util.find_spec(f"robolora.envs.{get_spec(t).module}") is not None
    ]
    print(f"{args.episodes} episodes per task, {args.image_size} px, cameras {'+'.join(args.cameras)}, "
          f"noise {'expert default' if args.noise is None else args.noise}")
    header = f"{'task':<14}{'success':>9}{'length':>8}{'step ms':>9}{'physics ms':>12}{'render ms':>11}{'demos/s':>9}"
    print(header)
    print("-" * len(header))
    for task in tasks:
        r = bench_task(task, args.episodes, args.noise, args.image_size, tuple(args.cameras))
        print(f"{task:<14}{r['success']:>9.2f}{r['length']:>8.1f}{r['step_ms']:>9.2f}{r['physics_ms']:>12.2f}"
              f"{r['render_ms']:>11.2f}{r['demos_per_s']:>9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
