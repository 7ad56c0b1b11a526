"""The command line: version, help, the LoRA demonstration and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import robolora
from robolora.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert robolora.__version__ in capsys.readouterr().out


def test_demo_reports_exact_lora_mechanics(capsys):
    assert main(["demo", "--mechanics", "--preset", "tiny", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["demo/fresh_adapter_max_diff"] == 0.0
    assert m["demo/switch_back_max_diff"] == 0.0
    assert m["demo/base_restored_bit_exact"] == 1.0
    assert m["demo/merged_vs_unmerged_max_diff"] <= 1e-5
    assert m["demo/skill_output_gap"] > 1e-3


def test_info_on_a_folder_that_is_nothing_is_a_clear_error(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "not a robolora checkpoint" in capsys.readouterr().err


def test_train_skill_targets_and_execution_reach_the_adapter(tmp_path, capsys):
    from robolora.data import collect
    from robolora.policies import load_policy
    from robolora.recipes import shipped_base
    from robolora.skills import SkillManager

    collect("robolora/Wipe-v0", 1, tmp_path / "wipe", seed=0)
    assert main(["train-skill", "--data", str(tmp_path / "wipe"), "--out", str(tmp_path / "run"), "--rank", "2",
                 "--targets", "attn.q, attn.v,action_head", "--n-action-steps", "8", "--steps", "2",
                 "--batch-size", "4", "--json"]) == 0
    capsys.readouterr()
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter.json").read_text())
    assert meta["lora"]["targets"] == ["attn.q", "attn.v", "action_head"]
    assert "action_head" in meta["layers"] and meta["execution"] == {"n_action_steps": 8}
    assert meta["train_config"]["device"] in ("cpu", "cuda")  # where it ran, not the "auto" it was asked for
    manager = SkillManager(load_policy(shipped_base()))
    manager.load(tmp_path / "run" / "adapter")
    manager.activate("wipe")
    manager.apply_pending()
    assert manager.execution.n_action_steps == 8


def test_train_skill_conv_adapts_the_camera_stems_too(tmp_path, capsys):
    """--conv adds the vision encoder's convolutions (LoRAConv2d) to the targets; the skill loads and is live."""
    from robolora.data import collect
    from robolora.policies import load_policy
    from robolora.recipes import shipped_base
    from robolora.skills import SkillManager

    collect("robolora/Wipe-v0", 1, tmp_path / "wipe", seed=0)
    assert main(["train-skill", "--data", str(tmp_path / "wipe"), "--out", str(tmp_path / "run"), "--rank", "2",
                 "--conv", "--steps", "3", "--batch-size", "4", "--json"]) == 0
    capsys.readouterr()
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter.json").read_text())
    base = load_policy(shipped_base())
    convs = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and set(convs) <= set(meta["layers"]) and "blocks.0.attn.q" in meta["layers"]
    manager = SkillManager(base)
    assert manager.load(tmp_path / "run" / "adapter").live


def test_train_skill_temporal_ensemble_is_the_skills_execution(tmp_path, capsys):
    from robolora.data import collect
    from robolora.policies import load_policy
    from robolora.recipes import shipped_base
    from robolora.skills import SkillManager

    collect("robolora/Wipe-v0", 1, tmp_path / "wipe", seed=0)
    common = ["train-skill", "--data", str(tmp_path / "wipe"), "--rank", "2", "--steps", "2", "--batch-size", "4",
              "--json", "--temporal-ensemble", "0.05"]
    assert main(common + ["--out", str(tmp_path / "bad"), "--n-action-steps", "8"]) == 2
    assert "drop --n-action-steps 8" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before any training
    assert main(common + ["--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter.json").read_text())
    assert meta["execution"] == {"n_action_steps": 1, "temporal_ensemble": 0.05}
    manager = SkillManager(load_policy(shipped_base()))
    manager.load(tmp_path / "run" / "adapter")
    manager.activate("wipe")
    manager.apply_pending()
    assert (manager.execution.n_action_steps, manager.execution.temporal_ensemble) == (1, 0.05)


@pytest.mark.parametrize("bad", ["push", "push=0", "push=-1", "push=nan", "=2"])
def test_pretrain_task_weight_must_be_task_eq_positive_number(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--task-weight", bad])
    assert exit_info.value.code == 2
    assert "expected TASK=W" in capsys.readouterr().err


def _one_line_error(capsys, command: str) -> str:
    """The error a refused command printed: its last stderr line, with no traceback and no progress bar before it."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and "it/s]" not in err and "%|" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"robolora {command}: error: "), err
    return last


@pytest.mark.parametrize("command, argv", [
    ("eval", ["eval", "--task", "reach", "dish", "--episodes", "1"]),
    ("collect", ["collect", "--task", "dish", "--episodes", "1", "--out", "{tmp}/data"]),
    ("control", ["control", "--env", "dish", "--bundle", "{tmp}", "--episodes", "1"]),
])
def test_unknown_task_is_a_one_line_usage_error(command, argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(tmp=tmp_path) for a in argv])
    assert exit_info.value.code == 2
    line = _one_line_error(capsys, command)
    assert "unknown task 'dish'" in line and "'dish_rack'" in line and "robolora/DishRack-v0" in line
    assert not (tmp_path / "data").exists()


def test_task_ids_are_accepted_where_task_names_are():
    from robolora.cli import build_parser

    args = build_parser().parse_args(["eval", "--task", "robolora/Reach-v0", "push"])
    assert args.task == ["reach", "push"]


def test_pretrain_task_weight_must_name_a_base_task(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--task-weight", "dish=2"])
    assert exit_info.value.code == 2
    line = _one_line_error(capsys, "pretrain")
    assert "'dish' is not a base task" in line and "'reach'" in line


def test_unknown_skill_is_refused_before_a_progress_bar_is_drawn(capsys):
    assert main(["rollout", "--skills", "pour", "--episodes", "1", "--device", "cpu"]) == 2
    line = _one_line_error(capsys, "rollout")
    assert "'pour'" in line and "shipped: ['dish_rack', 'wipe']" in line


def test_export_action_bounds_are_refused_for_a_robolora_base(tmp_path, capsys):
    """--action-bounds sets a LeRobot policy's bounds; a robolora policy has its own, so nothing is written."""
    assert main(["export", "--out", str(tmp_path / "bundle"), "--action-bounds", "-1", "1"]) != 0
    assert "--action-bounds is for a LeRobot policy folder" in capsys.readouterr().err
    assert not (tmp_path / "bundle").exists()
