"""The README tutorial, run as a new user would: each command in a subprocess from an empty temporary folder,
with tiny settings (few demos, few steps, one episode), through the installed `robolora` console script, ending
with the torch-free kitchen on the shipped skills' learned completion heads. Slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(sys.executable).parent / "robolora"  # the console script pip installed next to this interpreter
ROBOLORA = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "robolora.cli"]


def run(cwd: Path, *args: str) -> dict:
    env = {**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*ROBOLORA, *args, "--json"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"robolora {' '.join(args)} failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


def test_readme_tutorial_from_collect_to_control(tmp_path):
    collected = run(tmp_path, "collect", "--task", "dish_rack", "--episodes", "2", "--out", "data/dish_rack")
    assert collected["episodes"] == 2 and (tmp_path / "data/dish_rack/manifest.json").exists()

    trained = run(tmp_path, "train-skill", "--data", "data/dish_rack", "--out", "runs/dish_rack", "--rank", "2",
                  "--lr", "2e-3", "--temporal-ensemble", "0.05", "--targets",
                  "attn.q,attn.k,attn.v,attn.o,mlp.fc1,mlp.fc2,action_head,proprio_proj", "--steps", "4",
                  "--batch-size", "8")
    assert 1.8 < trained["trainable_percent_of_base"] < 2.0  # rank 2 on every Linear, as the README says
    meta = json.loads((tmp_path / "runs/dish_rack/adapter/adapter.json").read_text())
    assert meta["execution"] == {"n_action_steps": 1, "temporal_ensemble": 0.05} and "action_head" in meta["layers"]

    evaluated = run(tmp_path, "eval", "--skill", "runs/dish_rack", "--task", "dish_rack", "--episodes", "1",
                    "--video", "dish_rack.gif")
    assert evaluated["results"][0]["episodes"] == 1 and (tmp_path / "dish_rack.gif").exists()

    rolled = run(tmp_path, "rollout", "--skills", "wipe,runs/dish_rack/adapter", "--episodes", "1")
    assert rolled["rollout/episodes"] == 1 and rolled["skills"] == ["wipe", "dish_rack"]

    exported = run(tmp_path, "export", "--skill", "runs/dish_rack", "--out", "bundles/dish_rack")
    assert exported["parity"]["max_abs_diff"] <= 2e-5 and exported["skill"] == "dish_rack"

    controlled = run(tmp_path, "control", "--bundle", "bundles/dish_rack", "--env", "dish_rack", "--hz", "0",
                     "--episodes", "1")
    assert controlled["control/episodes"] == 1 and controlled["control/faults"] == 0

    info = run(tmp_path, "info", "runs/dish_rack/adapter")
    assert info["kind"] == "skill adapter" and info["adapter"]["skill"] == "dish_rack"

    # 7. the torch-free kitchen: both shipped skills in one bundle, switched on their learned completion heads
    kitchen = run(tmp_path, "export", "--skills", "wipe,dish_rack", "--sequence", "wipe,dish_rack", "--out",
                  "bundles/kitchen")
    assert kitchen["sequence"] == ["wipe", "dish_rack"] and set(kitchen["completion"]) == {"wipe", "dish_rack"}
    controlled = run(tmp_path, "control", "--bundle", "bundles/kitchen", "--env", "kitchen", "--sequence",
                     "wipe,dish_rack", "--switch", "learned", "--hz", "0", "--episodes", "1")
    assert controlled["control/episodes"] == 1 and controlled["control/faults"] == 0
    assert run(tmp_path, "info", "bundles/kitchen")["kind"] == "multi-skill bundle"
