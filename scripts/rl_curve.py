"""Plot RL validation success against environment steps (docs/rl_curve.png) from finetune-rl run folders.

Usage:
    python scripts/rl_curve.py --runs runs/rl_wipe_s0 runs/rl_wipe_s1 runs/rl_dish_rack_s0 runs/rl_dish_rack_s1 \\
        --bc200 wipe=0.96 dish_rack=0.96 --out docs/rl_curve.png

Each run folder's OUT/checkpoint/state.json (or OUT/adapter/adapter.json "rl") holds the validation curve; the
curve's step-0 point is the BC skill itself. ``--bc200`` draws each skill's 200-demo BC level (held-out) as a
reference line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curve(run: Path) -> tuple[str, list[list[float]]]:
    state = run / "checkpoint" / "state.json"
    if state.is_file():
        data = json.loads(state.read_text())
        return data["env_id"], data["state"]["curve"]
    rl = json.loads((run / "adapter" / "adapter.json").read_text())["rl"]
    return rl["env_id"], rl["validation"]["curve"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, nargs="+", required=True)
    p.add_argument("--bc200", nargs="*", default=[], help="skill=success reference lines")
    p.add_argument("--out", type=Path, default=Path("docs/rl_curve.png"))
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skills: dict[str, list[tuple[str, list[list[float]]]]] = {}
    for run in args.runs:
        env_id, points = curve(run)
        skills.setdefault(env_id, []).append((run.name, points))
    bc200 = dict(item.split("=") for item in args.bc200)
    fig, axes = plt.subplots(1, len(skills), figsize=(5.5 * len(skills), 3.8), squeeze=False)
    for ax, (env_id, runs) in zip(axes[0], sorted(skills.items())):
        name = next((k for k in bc200 if k.replace("_", "").lower() in env_id.replace("_", "").lower()), None)
        for label, points in runs:
            ax.plot([s / 1e3 for s, _ in points], [v for _, v in points], marker="o", ms=3, label=label)
        ax.axhline(runs[0][1][0][1], color="grey", ls=":", label="BC 50 demos (step 0)")
        if name is not None:
            ax.axhline(float(bc200[name]), color="black", ls="--", label="BC 200 demos (held-out)")
        ax.axhline(0.9, color="red", lw=0.6, label="goal 0.90")
        ax.set(title=env_id, xlabel="env steps (thousands)", ylabel="validation success (20 episodes)",
               ylim=(0, 1.05))
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
