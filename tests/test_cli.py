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
