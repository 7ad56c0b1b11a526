"""scripts/bench_skills.py: one tiny run prints the ACT policy's rows beside the visuomotor ones' format, and the
adapters it hands PEFT compute what ours compute."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_skills.py"


@pytest.fixture(scope="module")
def bench_skills():
    spec = importlib.util.spec_from_file_location("bench_skills", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_a_tiny_act_run_prints_every_mode_and_peft_matches_ours(bench_skills, capsys):
    bench_skills.main(["--configs", "act", "--act-preset", "tiny", "--act-skills", "2", "--step-rounds", "3",
                       "--no-compile"])
    out = capsys.readouterr().out
    rows = {line.split(" | ")[1]: line.strip("| ").split(" | ") for line in out.splitlines()
            if line.startswith("| act tiny | ")}
    assert {"plain base", "bank", "inplace", "unmerged", "inplace (cache_merged)"} <= set(rows)
    for mode in ("bank", "inplace", "unmerged"):
        step_ratio, switch_p99 = rows[mode][4], rows[mode][7]
        assert float(step_ratio) > 0 and float(switch_p99) > 0, rows[mode]
    if importlib.util.find_spec("peft") is None:
        return
    assert {"PEFT unmerged", "PEFT merged", "PEFT set_adapter", "PEFT hotswap_adapter"} <= set(rows)
    parity = next(line for line in out.splitlines() if line.startswith("[act tiny] parity"))
    gap = float(re.findall(r"(\d\.\d+e[+-]\d+)", parity)[0])
    assert gap < 1e-5, parity  # to_peft's files make the installed peft act as ours
