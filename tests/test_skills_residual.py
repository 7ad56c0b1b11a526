"""SkillManager with skills that carry a residual action head (robolora.residual): in every mode the manager's chunk
is the plain policy's with the skill's head installed by hand, switching to a skill without one (or the plain base)
gives the exact original chunk, the base weights stay bit-identical, switches reuse the head made on attach, blends
with a head are refused, and detach/close remove it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from robolora.skills import MODES, SkillManager
from test_residual import residual_head
from test_skills import BATCH, assert_base_intact, base_state, make_adapter, run, step, tiny


def skills() -> dict:
    """s1 and s3 carry different non-zero residual heads, s2 none."""
    return {"s1": dataclasses.replace(make_adapter(1), residual=residual_head(11)),
            "s2": make_adapter(2),
            "s3": dataclasses.replace(make_adapter(3), residual=residual_head(33))}


def manager(mode: str, adapters: dict) -> SkillManager:
    mgr = SkillManager(tiny(), mode)
    for name, adapter in adapters.items():
        mgr.attach(name, adapter)
    return mgr


@pytest.mark.parametrize("mode", MODES)
def test_residual_skills_match_the_hand_installed_head_and_switch_back_exactly(mode):
    adapters = skills()
    mgr = manager(mode, adapters)
    bare = manager(mode, {n: dataclasses.replace(a, residual=None) for n, a in adapters.items()})
    original, plain = base_state(mgr.policy), run(tiny())
    first = {name: step(mgr, name) for name in ("s1", "s2", "s3")}
    for name in ("s1", "s3"):
        without = step(bare, name)
        bare.policy.set_action_residual(adapters[name].residual)  # by hand, on the same skill without a head
        assert torch.equal(bare.predict_chunk(BATCH), first[name]), name
        bare.policy.set_action_residual(None)
        assert (first[name] - without).abs().max() > 1e-2, f"{name}'s head must change the actions"
    assert torch.equal(first["s2"], step(bare, "s2")), "a skill without a head runs as before"
    for name in ("s2", "s1", "s3", "s1", "s2", None, "s3", "s2"):
        expected = plain if name is None else first[name]
        assert torch.equal(step(mgr, name), expected), f"switching to {name} must give its chunk exactly"
    assert torch.equal(step(mgr, None), plain)
    assert_base_intact(mgr.policy, original)


@pytest.mark.parametrize("mode", MODES)
def test_switches_reuse_the_head_made_on_attach(mode):
    mgr = manager(mode, skills())
    step(mgr, "s1")
    installed = mgr.policy._action_residual
    pointers = [p.data_ptr() for p in installed.parameters()]
    for name in ("s2", "s3", None, "s1"):
        step(mgr, name)
    assert mgr.policy._action_residual is installed
    assert [p.data_ptr() for p in installed.parameters()] == pointers
    step(mgr, "s2")
    assert mgr.policy._action_residual is None


def test_blends_with_a_head_are_refused_and_others_still_work():
    mgr = manager("bank", {**skills(), "s4": make_adapter(4)})
    step(mgr, "s1")
    with pytest.raises(ValueError, match=r"\['s1'\] carry a residual action head, which has no weighted sum"):
        mgr.blend({"s1": 0.5, "s2": 0.5})
    with pytest.raises(ValueError, match="residual action head"):
        mgr.blend({"s3": 0.7})
    mgr.blend({"s2": 0.5, "s4": 0.5})
    blended = mgr.predict_chunk(BATCH)
    assert mgr.policy._action_residual is None and not torch.equal(blended, step(mgr, "s2"))


@pytest.mark.parametrize("mode", MODES)
def test_detach_and_close_remove_the_head(mode):
    mgr = manager(mode, skills())
    plain = run(tiny())
    step(mgr, "s3")
    mgr.detach("s3")
    assert torch.equal(mgr.predict_chunk(BATCH), plain)
    step(mgr, "s1")
    mgr.close()
    assert torch.equal(run(mgr.policy), plain) and mgr.policy._action_residual is None


@pytest.mark.parametrize("mode", MODES)
def test_failed_residual_attach_leaves_the_manager_unchanged(mode):
    mgr = manager(mode, {"s1": skills()["s1"]})
    before, memory = step(mgr, "s1"), mgr.memory_bytes()
    bad = dataclasses.replace(make_adapter(2), residual=residual_head(chunk_size=4))
    with pytest.raises(ValueError, match=r"expects \(features, chunk, action\) = \(32, 4, 4\)"):
        mgr.attach("bad", bad)
    assert torch.equal(mgr.predict_chunk(BATCH), before) and mgr.memory_bytes() == memory
    assert mgr.skills == ["s1"] and mgr.active == "s1"


def test_memory_counts_the_head():
    with_head = manager("unmerged", {"s1": skills()["s1"]})
    without = manager("unmerged", {"s1": make_adapter(1)})
    assert with_head.memory_bytes()["s1"] - without.memory_bytes()["s1"] == 808 * 4
