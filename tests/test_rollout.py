"""Tests for multi-skill rollouts (robolora/rollout.py): where switches land, the metrics, the video, bad input.

The switching logic is tested with the kitchen's scripted stage experts behind SkillManager's acting interface
(they only succeed when each acts in its own stage); the real SkillManager path with a tiny policy and two random
adapters loaded from disk.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from robolora.adapters import adapter_from_policy, save_adapter
from robolora.config import LoRAConfig
from robolora.envs import make, make_expert
from robolora.envs.kitchen import STAGES
from robolora.inject import inject_lora, lora_layers
from robolora.policies import PolicyConfig, VisuomotorPolicy
from robolora.rollout import parse_skills, rollout


class ScriptedManager:
    """SkillManager's acting interface (skills, activate, apply_pending, reset, select_action) over the kitchen's
    stage experts; logs which skill acted at every tick and whether the dirt was all wiped at that moment."""

    def __init__(self, env) -> None:  # noqa: ANN001 - a wrapped kitchen env
        self.env = env.unwrapped
        self.experts = dict(zip(STAGES, make_expert(env, seed=0).stages))
        self.skills = list(self.experts)
        self.active: str | None = None
        self.pending: str | None = None
        self.calls: list[tuple[str, bool]] = []

    def load(self, path):  # noqa: ANN001, ANN201
        raise AssertionError(f"attached skills must not be loaded again ({path})")

    def activate(self, name: str) -> None:
        self.pending = name

    def apply_pending(self) -> None:
        self.active = self.pending

    def reset(self) -> None:
        for expert in self.experts.values():
            expert.reset()

    def select_action(self, obs: dict) -> np.ndarray:
        assert self.active is not None
        self.calls.append((self.active, bool(self.env.wiped.all())))
        return self.experts[self.active].act()


def test_success_switching_hands_over_exactly_at_the_stage_boundary() -> None:
    env = make("kitchen")
    manager = ScriptedManager(env)
    m = rollout(manager, ["wipe", "dish_rack"], episodes=2, seed=3, env=env)
    env.close()
    assert m["rollout/success_rate"] == 1.0 and m["rollout/stage0/wipe/success_rate"] == 1.0
    assert m["rollout/stage1/dish_rack/success_rate"] == 1.0
    assert [(skill == "dish_rack") for skill, _ in manager.calls] == [wiped for _, wiped in manager.calls]
    first = m["episodes"][0]
    switch_tick = first["switch_ticks"][0]
    assert first["stage_success"] == [True, True] and first["switch_ticks"] == [switch_tick]
    episode_calls = manager.calls[:first["length"]]
    assert episode_calls[switch_tick - 1] == ("wipe", False) and episode_calls[switch_tick] == ("dish_rack", True)
    assert m["rollout/switches"] == 4  # each episode: wipe at its start, dish_rack at the boundary


def test_schedule_switching_at_the_given_tick() -> None:
    env = make("kitchen", max_episode_steps=20)
    manager = ScriptedManager(env)
    m = rollout(manager, "wipe,dish_rack", episodes=1, seed=0, switch="schedule", schedule_ticks=[7], env=env)
    env.close()
    assert [skill for skill, _ in manager.calls] == ["wipe"] * 7 + ["dish_rack"] * 13
    assert m["episodes"][0]["switch_ticks"] == [7] and m["episodes"][0]["length"] == 20
    assert m["rollout/success_rate"] == 0.0


def tiny_skill(policy: VisuomotorPolicy, name: str, seed: int) -> VisuomotorPolicy:
    """``policy`` with a random trained-looking LoRA skill ``name`` (non-zero B) and skill token."""
    g = torch.Generator().manual_seed(seed)
    inject_lora(policy, LoRAConfig(rank=4, alpha=8.0), name, generator=g)
    with torch.no_grad():
        for layer in lora_layers(policy).values():
            layer.lora_B[name].normal_(0, 0.1, generator=g)
    policy.set_skill_token(torch.nn.Parameter(torch.randn(policy.config.d_model, generator=g)))
    return policy


def test_real_skill_manager_metrics_and_video(tmp_path) -> None:
    for seed, name in enumerate(("wipe", "dish_rack")):
        torch.manual_seed(0)
        policy = tiny_skill(VisuomotorPolicy(PolicyConfig.preset("tiny")).eval(), name, seed + 1)
        save_adapter(adapter_from_policy(policy, name), tmp_path / name)
    torch.manual_seed(0)
    base = VisuomotorPolicy(PolicyConfig.preset("tiny")).eval()
    done: list[int] = []
    m = rollout(base, [tmp_path / "wipe", tmp_path / "dish_rack"], episodes=2, seed=0, switch="schedule",
                schedule_ticks=[5], video_path=tmp_path / "kitchen.gif", progress=done.append)
    assert done == [1, 2]
    for key in ("rollout/success_rate", "rollout/ci_low", "rollout/ci_high", "rollout/mean_length",
                "rollout/stage0/wipe/success_rate", "rollout/stage1/dish_rack/ci_high", "rollout/switch_us_p50",
                "rollout/switch_us_p99", "rollout/switch_us_max", "rollout/latency_ms_p50", "rollout/latency_ms_p99"):
        assert math.isfinite(m[key]), key
    assert m["skills"] == ["wipe", "dish_rack"] and m["rollout/switches"] == 4
    assert [e["switch_ticks"] for e in m["episodes"]] == [[5], [5]]
    assert all(e["length"] == 350 for e in m["episodes"])  # random skills never finish the kitchen
    assert 0 < m["rollout/switch_us_p50"] <= m["rollout/switch_us_max"]
    from PIL import Image

    with Image.open(m["video"]) as gif:
        assert gif.n_frames > 1 and gif.size == (256, 256)  # (Pillow merges identical consecutive frames)
        label = np.asarray(gif.convert("RGB"))[:16, :40]
    assert (label.max(axis=2) < 30).mean() > 0.5 and (label.min(axis=2) > 225).any()  # the skill name, drawn
    assert base.skill_token is None and not lora_layers(base)  # the manager it made was closed


def test_bad_input_is_refused_with_a_fix() -> None:
    env = make("kitchen")
    manager = ScriptedManager(env)
    with pytest.raises(ValueError, match="one skill per stage"):
        rollout(manager, ["wipe"], episodes=1, env=env)
    with pytest.raises(ValueError, match="increasing ticks"):
        rollout(manager, ["wipe", "dish_rack"], episodes=1, switch="schedule", env=env)
    with pytest.raises(ValueError, match="switch="):
        rollout(manager, ["wipe", "dish_rack"], episodes=1, switch="never", env=env)
    with pytest.raises(FileNotFoundError, match="shipped"):
        rollout(manager, ["wipe", "pour"], episodes=1, env=env)
    env.close()
    assert parse_skills("wipe, dish_rack,") == ["wipe", "dish_rack"]


@pytest.mark.slow
def test_shipped_skills_finish_the_kitchen() -> None:
    """The issue's target: the two-stage kitchen with the shipped adapters succeeds in >= 80% of 50 held-out episodes
    (measured 0.90: wipe 0.96, then dish_rack 45 of 48; a few minutes on one core)."""
    from robolora.recipes import shipped_base
    from robolora.rollout import rollout_main, shipped_skills_dir

    missing = [p for p in (shipped_base(), shipped_skills_dir() / "wipe", shipped_skills_dir() / "dish_rack")
               if not p.is_dir()]
    if missing:
        pytest.skip(f"not shipped yet: {[str(p) for p in missing]}")
    m = rollout_main("wipe,dish_rack", shipped_base(), episodes=50)
    assert m["rollout/success_rate"] >= 0.8, {k: v for k, v in m.items() if k != "episodes"}
