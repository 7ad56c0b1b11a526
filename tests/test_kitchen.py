"""Tests for the kitchen scene and the two-stage kitchen task (envs/kitchen_scene.py, envs/kitchen.py).

The Gymnasium contract of robolora/Kitchen-v0 is tested with every other task in tests/test_envs.py; this file
tests what makes skill adapters transfer: the skill tasks show the kitchen's scene, the kitchen's stages start in
the skill tasks' start states, the experts keep clear of the fixtures, and the stage signals.
"""

from __future__ import annotations

import numpy as np
import pytest

from robolora.envs import make, make_expert
from robolora.envs.kitchen import KitchenEnv
from robolora.envs.kitchen_scene import N_SLOTS, SPONGE_REST_HIGH, SPONGE_REST_LOW, SPOT_HIGH, SPOT_LOW

FIXTURES = {"plate_holder", "rack"}


def run_expert(env, seed: int, on_step=None) -> dict:  # noqa: ANN001 - a wrapped env
    """One seeded expert episode at the default noise; ``on_step(info)`` after each step; returns the last info."""
    env.reset(seed=seed)
    expert = make_expert(env, seed=seed)
    expert.reset()
    while True:
        _, _, terminated, truncated, info = env.step(expert.perturb(expert.act(), expert.default_noise))
        if on_step is not None:
            on_step(info)
        if terminated or truncated:
            return info


def touching(env, body: str) -> set[str]:  # noqa: ANN001
    """Top-level bodies (below the world) in contact with ``body`` now."""
    model, data = env.model, env.data

    def root(geom: int) -> str:
        b = model.geom_bodyid[geom]
        while model.body_parentid[b] != 0:
            b = model.body_parentid[b]
        return model.body(b).name

    found = set()
    for contact in data.contact[: data.ncon]:
        a, b = root(contact.geom1), root(contact.geom2)
        if body in (a, b):
            found.add(b if a == body else a)
    return found


# ------------------------------------------------------------------------------------------- skill scenes


@pytest.mark.parametrize("task", ["wipe", "dish_rack", "kitchen"])
def test_every_skill_scene_shows_the_kitchen_props_with_one_slot_lit(task: str) -> None:
    env = make(task)
    for seed in range(4):
        env.reset(seed=seed)
        base = env.unwrapped
        for body in ("plate_holder", "plate", "rack", "sponge"):
            assert abs(base.body_pos(body)[0]) < 0.3 and abs(base.body_pos(body)[1]) < 0.3, (task, body)
        assert abs(base.body_pos("plate")[0] - base.body_pos("plate_holder")[0]) < 1e-9  # plate in its holder
        lit = [base.model.geom(f"rack_marker_{s}").rgba[1] > 0.8 for s in range(N_SLOTS)]
        assert sum(lit) == 1 and lit[base.target_slot]
    env.close()


def test_dish_rack_has_no_dirt_and_the_sponge_where_wiping_leaves_it() -> None:
    env = make("dish_rack")
    held = []
    for seed in range(40):
        env.reset(seed=seed)
        base = env.unwrapped
        assert all(base.model.geom(f"dirt_{i}").pos[2] < 0 for i in range(8))  # under the table: wiped already
        sponge = base.body_pos("sponge")
        assert np.all(sponge[:2] >= SPONGE_REST_LOW) and np.all(sponge[:2] <= SPONGE_REST_HIGH)
        held.append(base.grasped("sponge"))
        if held[-1]:  # the hand-over state: closed on the sponge, pressed on the table
            assert base.proprio()[9] == -1.0 and base.tcp_pos[2] < 0.025
    env.close()
    assert 10 <= sum(held) <= 30, f"{sum(held)} of 40 episodes start with the sponge held"


def test_dirt_lies_between_holder_and_rack() -> None:
    env = make("wipe")
    for seed in range(20):
        env.reset(seed=seed)
        spots = env.unwrapped.spots
        assert np.all(spots >= SPOT_LOW) and np.all(spots <= SPOT_HIGH)
    env.close()


@pytest.mark.parametrize("task", ["wipe", "dish_rack"])
def test_experts_never_touch_a_fixture_with_the_sponge_or_the_gripper(task: str) -> None:
    env = make(task)
    base = env.unwrapped
    hits: list[set[str]] = []

    def check(info: dict) -> None:
        hits.append(touching(base, "sponge") & (FIXTURES | {"plate"}))
        if task == "wipe":  # the gripper only ever meets the sponge
            hits.append(touching(base, "hand") & (FIXTURES | {"plate"}))

    assert all(run_expert(env, seed, check)["success"] for seed in range(4))
    env.close()
    assert not any(hits), [h for h in hits if h]


# ---------------------------------------------------------------------------------------------- kitchen


def test_kitchen_stage_one_replays_the_wipe_episode_with_the_same_seeds() -> None:
    frames: dict[str, list[np.ndarray]] = {}
    for task in ("wipe", "kitchen"):
        env = make(task)
        obs, _ = env.reset(seed=5)
        expert = make_expert(env, seed=5)
        expert.reset()
        frames[task] = [obs["rgb_front"]]
        for _ in range(30):
            obs, *_ = env.step(expert.perturb(expert.act(), 0.3))
            frames[task].append(obs["rgb_front"])
        env.close()
    np.testing.assert_array_equal(np.stack(frames["wipe"]), np.stack(frames["kitchen"]))


def test_stage_info_switches_when_the_dirt_is_gone_and_success_needs_both() -> None:
    env = make("kitchen")
    _, info = env.reset(seed=0)
    assert info["stage"] == 0 and info["stage_success"] == (False, False) and not info["success"]
    infos: list[dict] = []
    last = run_expert(env, 0, infos.append)
    env.close()
    assert last["success"] and last["stage_success"] == (True, True) and len(infos) <= 350
    stages = [i["stage"] for i in infos]
    switch = stages.index(1)
    assert all(s == 0 for s in stages[:switch]) and all(s == 1 for s in stages[switch:])
    assert [i["stage_success"][0] for i in infos] == [s == 1 for s in stages]  # stage 1 starts at wipe success
    assert not any(i["success"] for i in infos[:-1])  # terminated on the first overall success


def test_racking_the_plate_before_wiping_is_not_success() -> None:
    env = make("kitchen", terminate_on_success=False)
    env.reset(seed=0)
    base: KitchenEnv = env.unwrapped
    base.set_free_pose("plate", base.slot_pos + np.array([0.0, 0.0, 0.046]), np.array([1.0, 0.0, 0.0, 0.0]))
    for _ in range(5):
        _, _, terminated, _, info = env.step(np.array([0.0, 0.0, 0.0, 1.0], np.float32))
    env.close()
    assert info["stage"] == 0 and info["stage_success"] == (False, True)
    assert not info["success"] and not terminated


def test_kitchen_expert_succeeds_on_a_few_seeds() -> None:
    env = make("kitchen")
    results = [run_expert(env, seed)["success"] for seed in (100, 101)]
    env.close()
    assert all(results)


@pytest.mark.slow
def test_kitchen_expert_success_rate() -> None:
    env = make("kitchen")
    successes = [run_expert(env, 2000 + seed)["success"] for seed in range(50)]
    env.close()
    assert np.mean(successes) >= 0.9, f"kitchen expert success {np.mean(successes):.2f} < 0.9"
