"""Write docs/tasks.png: what the policy sees in every task, at the start of an episode and at success.

Usage:
    python scripts/contact_sheet.py                        # every available task -> docs/tasks.png
    python scripts/contact_sheet.py --out /tmp/sheet.png --seed 3 --image-size 64

Each row is one registered task; the columns are the policy's front-camera observation (``--image-size`` pixels,
upscaled with nearest-neighbour so the real resolution stays visible) after ``reset`` and at the step the
scripted expert reaches success (noise-free expert; the first of five seeds that succeeds). docs/design.md §8.2
("Observations") asks that every target be visible at this resolution; this sheet is how to check it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from robolora.envs import TASKS, get_spec, make, make_expert  # noqa: E402


def task_frames(task: str, seed: int, image_size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(start frame, success frame, label of the second) for the first succeeding seed from ``seed``."""
    env = make(task, image_size=image_size)
    try:
        for episode_seed in range(seed, seed + 5):
            obs, _ = env.reset(seed=episode_seed)
            start = obs["rgb_front"]
            expert = make_expert(env, seed=episode_seed)
            expert.reset()
            done, info, steps = False, {}, 0
            while not done:
                obs, _, terminated, truncated, info = env.step(expert.act())
                done, steps = terminated or truncated, steps + 1
            if info["success"]:
                return start, obs["rgb_front"], f"success: step {steps}, seed {episode_seed}"
        return start, obs["rgb_front"], f"no success in 5 seeds (last seed {episode_seed})"
    finally:
        env.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/tasks.png"), help="output PNG (default docs/tasks.png)")
    parser.add_argument("--seed", type=int, default=0, help="first episode seed tried per task (default 0)")
    parser.add_argument("--image-size", type=int, default=64, help="policy image size in pixels (default 64)")
    parser.add_argument("--tasks", nargs="+", default=None, help="task names (default: every available task)")
    args = parser.parse_args(argv)
    tasks = args.tasks or [
        t for t in TASKS if importlib.util.find_spec(f"robolora.envs.{get_spec(t).module}") is not None
    ]
    fig, axes = plt.subplots(2, len(tasks), figsize=(2.2 * len(tasks), 5.2), squeeze=False, layout="constrained")
    for col, task in enumerate(tasks):
        start, end, label = task_frames(task, args.seed, args.image_size)
        for row, (frame, title) in enumerate(((start, f"{task}: start"), (end, label))):
            ax = axes[row, col]
            ax.imshow(frame, interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        print(f"{task}: {label}", flush=True)
    fig.suptitle(f"robolora tasks: front camera at {args.image_size} px (the policy's view)", fontsize=10)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
