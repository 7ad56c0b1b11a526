"""Tests for the skill tasks dish_rack and wipe: what their success means, their visual cues and their experts.

The Gymnasium contract (check_env, same seed -> same episode, no leak between resets, renderers closed) and the
expert success rate over 50 seeded episodes (slow) are tested for every registered task, these two included, in
tests/test_envs.py; this file tests what is particular to the skills.
"""

from __future__ import annotations

import numpy as np
import pytest

from robolora.envs import make, make_expert
from robolora.envs.dish_rack import DishRackEnv
from robolora.envs.wipe import N_SPOTS, SPOT_HIGH, SPOT_LOW, SPOT_STEP, WipeEnv

OPEN_STILL = np.array([0.0, 0.0, 0.0, 1.0], np.float32)


def expert_episode(env, seed: int, on_step=None) -> tuple[bool, int]:  # noqa: ANN001 - a wrapped env
    """One seeded expert episode at the default noise; ``on_step(info)`` sees every step's info."""
    env.reset(seed=seed)
    expert = make_expert(env, seed=seed)
    expert.reset()
    for t in range(1, 1000):
        _, _, terminated, truncated, info = env.step(expert.perturb(expert.act(), expert.default_noise))
        if on_step is not None:
            on_step(info)
        if terminated or truncated:
            return bool(info["success"]), t
    raise AssertionError("episode never ended")


def green_columns(frame: np.ndarray) -> np.ndarray:
    """Column indices of saturated green pixels (the lit slot marker)."""
    pixels = frame.astype(int)
    green = (pixels[..., 1] > 120) & (pixels[..., 1] > pixels[..., 0] + 60) & (pixels[..., 1] > pixels[..., 2] + 60)
    return np.nonzero(green)[1]


# ------------------------------------------------------------------------------------------------- dish_rack


def test_one_marker_is_lit_and_readable_at_64_px() -> None:
    env = make("dish_rack")
    centres: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for seed in range(12):
        obs, _ = env.reset(seed=seed)
        base: DishRackEnv = env.unwrapped
        colours = [tuple(base.model.geom(f"rack_marker_{slot}").rgba) for slot in range(3)]
        assert sum(c[1] > 0.8 for c in colours) == 1 and colours[base.target_slot][1] > 0.8
        columns = green_columns(obs["rgb_front"])
        assert len(columns) >= 40, f"lit marker covers only {len(columns)} px of the 64 px frame"
        centres[base.target_slot].append(float(columns.mean()))
    env.close()
    assert all(centres.values()), f"every slot should be drawn in 12 seeds: {centres}"
    # The marker's image column alone tells the slot: left, middle and right markers never overlap.
    assert max(centres[0]) + 3 < min(centres[1]) and max(centres[1]) + 3 < min(centres[2])


def _place_plate(env, slot: int, quat: np.ndarray | None = None) -> DishRackEnv:  # noqa: ANN001
    base: DishRackEnv = env.unwrapped
    slot_pos = base.site_pos(f"rack_slot_{slot}")
    base.set_free_pose("plate", slot_pos + np.array([0.0, 0.0, 0.046]), quat)
    return base


def test_success_needs_the_lit_slot_upright_and_released() -> None:
    env = make("dish_rack", terminate_on_success=False)
    env.reset(seed=0)
    base = _place_plate(env, env.unwrapped.target_slot, np.array([1.0, 0.0, 0.0, 0.0]))
    infos = [env.step(OPEN_STILL)[-1] for _ in range(5)]
    assert infos[-1]["success"] and base.plate_in_slot()
    env.reset(seed=0)
    _place_plate(env, (env.unwrapped.target_slot + 1) % 3, np.array([1.0, 0.0, 0.0, 0.0]))
    assert not any(env.step(OPEN_STILL)[-1]["success"] for _ in range(5))
    env.reset(seed=0)
    flat = np.array([np.cos(np.pi / 4), 0.0, np.sin(np.pi / 4), 0.0])  # face down, lying on the rack
    _place_plate(env, env.unwrapped.target_slot, flat)
    assert not any(env.step(OPEN_STILL)[-1]["success"] for _ in range(5))
    env.close()


def test_a_released_plate_stays_in_its_slot() -> None:
    # A disc on its rim rolls along the slot without rolling friction; the task sets it (4 of 12 plates rolled out).
    env = make("dish_rack", terminate_on_success=False)
    env.reset(seed=0)
    base = _place_plate(env, env.unwrapped.target_slot, np.array([1.0, 0.0, 0.0, 0.0]))
    dof = base.model.jnt_dofadr[base.model.body("plate").jntadr[0]]
    base.data.qvel[dof + 1] = 0.05  # a 5 cm/s push along the slot, as a release can give
    successes = [env.step(OPEN_STILL)[-1]["success"] for _ in range(40)]
    assert all(successes[5:]) and base.plate_in_slot()
    env.close()


def test_dish_expert_inserts_before_it_releases() -> None:
    env = make("dish_rack")
    base: DishRackEnv = env.unwrapped
    states: list[tuple[bool, bool, bool]] = []
    success, length = expert_episode(env, 5, lambda info: states.append(
        (base.plate_in_slot(), base.plate_touched(), info["success"])))
    env.close()
    assert success and length <= 150
    assert any(in_slot and touched and not ok for in_slot, touched, ok in states)  # seated but held: not yet
    assert all(in_slot and not touched for in_slot, touched, ok in states if ok)


# ------------------------------------------------------------------------------------------------------ wipe


def test_dirt_lies_on_a_random_walk_across_the_work_area() -> None:
    env = make("wipe")
    walks = []
    for seed in (0, 1):
        env.reset(seed=seed)
        base: WipeEnv = env.unwrapped
        spots = base.spots
        steps = np.linalg.norm(np.diff(spots, axis=0), axis=1)
        assert spots.shape == (N_SPOTS, 2) and np.all(spots >= SPOT_LOW) and np.all(spots <= SPOT_HIGH)
        assert np.all(steps >= SPOT_STEP[0] - 1e-9) and np.all(steps <= SPOT_STEP[1] + 1e-9)
        for index, xy in enumerate(spots):
            geom = base.model.geom(f"dirt_{index}")
            np.testing.assert_allclose(geom.pos[:2], xy)
            assert geom.rgba[3] == 1.0 and 0.0 < geom.pos[2] < 0.002  # visible, on the table top
        walks.append(spots.copy())
    env.close()
    assert not np.allclose(walks[0], walks[1])


def test_a_sponge_resting_on_dirt_does_not_wipe_it() -> None:
    env = make("wipe", terminate_on_success=False)
    env.reset(seed=0)
    base: WipeEnv = env.unwrapped
    spot = base.spots[0]
    base.set_free_pose("sponge", np.array([spot[0], spot[1], 0.015]), np.array([1.0, 0.0, 0.0, 0.0]))
    for _ in range(5):
        env.step(OPEN_STILL)
    assert base.spots_under_sponge()[0] and not base.sponge_pressed()
    assert not base.wiped.any() and base.model.geom("dirt_0").rgba[3] == 1.0
    env.close()


def test_footprint_follows_the_face_that_is_down() -> None:
    env = make("wipe")
    env.reset(seed=0)
    base: WipeEnv = env.unwrapped
    centre = np.array([0.0, 0.0])
    base.spots = np.array([centre, centre + [0.02, 0.0], centre + [0.0, 0.035]] + [[0.3, 0.3]] * (N_SPOTS - 3))
    base.set_free_pose("sponge", np.array([0.0, 0.0, 0.015]), np.array([1.0, 0.0, 0.0, 0.0]))
    env.step(OPEN_STILL)
    assert base.spots_under_sponge()[:3].tolist() == [True, True, True]  # 5 x 8 cm face down
    on_side = np.array([np.cos(np.pi / 4), 0.0, np.sin(np.pi / 4), 0.0])  # 3 x 8 cm face down
    base.set_free_pose("sponge", np.array([0.0, 0.0, 0.025]), on_side)
    env.step(OPEN_STILL)
    assert base.spots_under_sponge()[:3].tolist() == [True, False, True]
    env.close()


def test_wipe_expert_hides_each_spot_as_the_pressed_sponge_covers_it() -> None:
    env = make("wipe")
    base: WipeEnv = env.unwrapped
    counts: list[int] = []

    def check(info: dict) -> None:
        counts.append(int(base.wiped.sum()))
        if len(counts) > 1 and counts[-1] > counts[-2]:
            assert base.sponge_pressed()
        alphas = np.array([base.model.geom(f"dirt_{i}").rgba[3] for i in range(N_SPOTS)])
        np.testing.assert_array_equal(alphas == 0.0, base.wiped)
        assert info["reward/wiped"] == pytest.approx(base.wiped.mean())

    success, length = expert_episode(env, 3, check)
    assert success and length <= 200 and counts[-1] == N_SPOTS and counts[0] < N_SPOTS
    env.reset(seed=3)  # the next episode starts with every spot dirty and visible again
    assert not base.wiped.any() and all(base.model.geom(f"dirt_{i}").rgba[3] == 1.0 for i in range(N_SPOTS))
    env.close()


@pytest.mark.parametrize("task", ["dish_rack", "wipe"])
def test_success_lasts_when_the_episode_runs_on(task: str) -> None:
    env = make(task, terminate_on_success=False)
    successes: list[bool] = []
    _, length = expert_episode(env, 7, lambda info: successes.append(info["success"]))
    env.close()
    first = successes.index(True)
    assert length == env.spec.max_episode_steps and first < length - 20  # ran on well past the first success
    assert all(successes[first:])


@pytest.mark.parametrize("task", ["dish_rack", "wipe"])
def test_experts_succeed_on_a_few_seeds(task: str) -> None:
    env = make(task)
    results = [expert_episode(env, seed) for seed in (100, 101, 102)]
    env.close()
    assert all(success for success, _ in results), results
