"""scripts/skill_table.py: cells are keyed by how their demos were recorded, so two recordings never share a row."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "skill_table.py"


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("skill_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cell(success: float, te: float | None = None) -> dict:
    execution = {"n_action_steps": 8} if te is None else {"n_action_steps": 1, "temporal_ensemble": te}
    return {"execution": execution, "eval": {"eval/success_rate": success, "eval/ci_low": success - 0.1, "eval/ci_high": success + 0.05},
            "trainable_params": 19100, "trainable_percent_of_base": 1.84, "size_bytes": 80936,
            "train_config": {"steps": 3000}, "selection": {"step": 2500}, "train_metrics": {"train/wall_s": 600.0}}


def test_cells_of_one_recipe_on_differently_recorded_demos_keep_their_own_rows(table, tmp_path):
    noise, quiet = table.expert_recording("dish_rack")
    assert (noise, quiet) == (0.2, True)  # today's dish_rack demos: noise 0.2, alignment executed clean
    cells = tmp_path / "cells"
    first = table.save_cell(cells, "dish_rack", 50, "lora_r2_all", 0.2, True, cell(0.66))
    second = table.save_cell(cells, "dish_rack", 50, "lora_r2_all", 0.2, False, cell(0.02))
    third = table.save_cell(cells, "dish_rack", 50, "lora_r2_all", 0.05, False, cell(0.54))
    ensembled = table.save_cell(cells, "dish_rack", 50, "lora_r2_all", 0.2, True, cell(0.7, te=0.05))
    assert len({first, second, third, ensembled}) == 4 and all(p.exists() for p in (first, second, third, ensembled))
    assert first.name == "dish_rack-50-lora_r2_all-noise0.2q.json"
    assert ensembled.name == "dish_rack-50-lora_r2_all-noise0.2q-te0.05.json"  # same demos, its own cell

    md, png = tmp_path / "table.md", tmp_path / "table.png"
    table.write_report(cells, md, png, "python scripts/skill_table.py --report-only")
    lines = md.read_text().splitlines()
    rows = [line for line in lines if line.startswith("| dish_rack |") and "| 50 | lora_r2_all |" in line]
    assert [r.split("|")[2].strip() for r in rows] == ["noise 0.2, clean alignment"] * 2 + ["noise 0.2", "noise 0.05"]
    assert [r.split("|")[5].strip() for r in rows] == ["chunks", "ensembled, m=0.05", "chunks", "chunks"]
    assert [r.split("|")[6].strip() for r in rows] == ["0.66", "0.70", "0.02", "0.54"]
    assert "2500" in rows[0]  # the step kept by checkpoint selection is shown
    # rows nobody ran are listed only for the demos as recorded today, not for every older recording
    not_run = [line for line in lines if "not run" in line and line.startswith("| dish_rack |")]
    assert not_run and all("clean alignment" in line for line in not_run)
    assert png.stat().st_size > 0
