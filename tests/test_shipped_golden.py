"""The shipped base and skills act bit-identically to the release before the policy protocol.

``tests/artifacts/shipped_golden/actions.safetensors`` holds, for fixed observations, the actions (10 control steps,
batch 3, with each skill's own chunk execution) and the raw chunks of the shipped base, wipe and dish_rack through
every SkillManager mode, computed with commit 38efdd7 (before ``robolora/policy.py``) by the same calls as
``run`` below (observations: torch.Generator seed 2024, 3 uint8 64 px front images then randn proprio).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from robolora.policies import load_policy
from robolora.recipes import shipped_base
from robolora.rollout import resolve_skill
from robolora.skills import MODES, SkillManager

GOLDEN = Path(__file__).parent / "artifacts" / "shipped_golden" / "actions.safetensors"


def run(mode: str, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    policy = load_policy(shipped_base()).eval()
    mgr = SkillManager(policy, mode)
    for skill in ("wipe", "dish_rack"):
        mgr.load(resolve_skill(skill))
    out = {}
    for skill in (None, "wipe", "dish_rack"):
        mgr.activate(skill)
        mgr.reset()
        actions = [mgr.select_action({k: v.numpy() for k, v in obs.items()}) for _ in range(10)]
        out[f"{mode}.{skill or 'base'}.actions"] = torch.as_tensor(np.stack(actions))
        out[f"{mode}.{skill or 'base'}.chunk"] = mgr.predict_chunk({**obs, "task_id": torch.arange(3)})
    mgr.close()
    return out


@pytest.mark.parametrize("mode", MODES)
def test_shipped_base_and_skills_act_bit_identically_to_the_previous_release(mode):
    golden = load_file(str(GOLDEN))
    obs = {"rgb_front": golden["obs.rgb_front"], "proprio": golden["obs.proprio"]}
    for key, value in run(mode, obs).items():
        assert torch.equal(value, golden[key]), f"{key}: max diff {(value - golden[key]).abs().max().item():.3g}"
