"""The command line: version, help, the LoRA demonstration and clear errors."""

from __future__ import annotations

import json

import pytest

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
    assert manager.policy.config.n_action_steps == 8


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
    assert (manager.policy.config.n_action_steps, manager.policy.config.temporal_ensemble) == (1, 0.05)


@pytest.mark.parametrize("bad", ["push", "push=0", "push=-1", "push=nan", "=2"])
def test_pretrain_task_weight_must_be_task_eq_positive_number(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--task-weight", bad])
    assert exit_info.value.code == 2
    assert "expected TASK=W" in capsys.readouterr().err
