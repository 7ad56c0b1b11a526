"""Tests for robolora.envs: Gymnasium contract, seeding, reset hygiene, rendering resources and the experts.

Every test that takes a task iterates over all registered tasks (``robolora.envs.TASKS``), so a new task module is
covered as soon as it exists; a task whose module is not written yet is skipped with that reason.
"""

from __future__ import annotations

import importlib.util
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from robolora.envs import BASE_TASKS, PROPRIO_DIM, SKILL_TASKS, TASKS, get_spec, make, make_expert
from robolora.envs.base import WORKSPACE_LOW, TabletopEnv

ALL_TASKS = list(TASKS)


def make_task(task: str, **kwargs: object) -> gym.Env:
    spec = get_spec(task)
    if importlib.util.find_spec(f"robolora.envs.{spec.module}") is None:
        pytest.skip(f"envs/{spec.module}.py is not written yet")
    return make(task, **kwargs)


def run_expert(env: gym.Env, seed: int, noise: float | None = None) -> tuple[bool, int]:
    """One seeded expert episode with DART noise; returns (success, length)."""
    env.reset(seed=seed)
    expert = make_expert(env, seed=seed)
    expert.reset()
    noise = expert.default_noise if noise is None else noise
    info: dict = {}
    for t in range(1, 10_000):
        _, _, terminated, truncated, info = env.step(expert.perturb(expert.act(), noise))
        if terminated or truncated:
            return bool(info["success"]), t
    raise AssertionError("episode never ended: the TimeLimit wrapper is missing")


def test_registry_matches_interfaces() -> None:
    assert list(TASKS.items()) == [
        ("reach", "robolora/Reach-v0"), ("push", "robolora/Push-v0"), ("pick_place", "robolora/PickPlace-v0"),
        ("drawer_open", "robolora/DrawerOpen-v0"), ("button_press", "robolora/ButtonPress-v0"),
        ("dish_rack", "robolora/DishRack-v0"), ("wipe", "robolora/Wipe-v0"), ("kitchen", "robolora/Kitchen-v0"),
    ]
    assert BASE_TASKS == ("reach", "push", "pick_place", "drawer_open", "button_press")
    assert SKILL_TASKS == ("dish_rack", "wipe")
    limits = {"reach": 50, "push": 100, "pick_place": 100, "drawer_open": 100, "button_press": 60,
              "dish_rack": 150, "wipe": 200, "kitchen": 350}
    assert {t: gym.spec(i).max_episode_steps for t, i in TASKS.items()} == limits
    with pytest.raises(KeyError, match="known names"):
        make("pour")


@pytest.mark.parametrize("task", ALL_TASKS)
def test_check_env(task: str) -> None:
    env = make_task(task, render_mode="rgb_array", render_size=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    env.close()
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("task", ALL_TASKS)
def test_make_by_id_and_spaces(task: str) -> None:
    env = make_task(TASKS[task], cameras=("front", "wrist"), image_size=48)
    obs, info = env.reset(seed=0)
    assert isinstance(info["success"], bool) and not info["success"]
    assert set(obs) == {"rgb_front", "rgb_wrist", "proprio"}
    assert obs["rgb_front"].shape == obs["rgb_wrist"].shape == (48, 48, 3)
    assert obs["rgb_front"].dtype == np.uint8 and obs["proprio"].dtype == np.float32
    assert obs["proprio"].shape == (PROPRIO_DIM,)
    assert env.observation_space.contains(obs)
    assert np.all(np.isfinite(env.observation_space["proprio"].low))
    assert env.action_space == gym.spaces.Box(-1, 1, (4,), np.float32)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert env.observation_space.contains(obs) and isinstance(reward, float)
    assert isinstance(info["success"], bool) and any(k.startswith("reward/") for k in info)
    env.close()


@pytest.mark.parametrize("task", ALL_TASKS)
def test_same_seed_same_episode_and_different_seeds_differ(task: str) -> None:
    actions = np.random.default_rng(0).uniform(-1, 1, (6, 4)).astype(np.float32)
    episodes = []
    for seed in (3, 3, 4):
        env = make_task(task)
        obs, _ = env.reset(seed=seed)
        frames = [obs]
        frames += [env.step(a)[0] for a in actions]
        episodes.append(frames)
        env.close()
    for a, b in zip(episodes[0], episodes[1]):
        np.testing.assert_array_equal(a["rgb_front"], b["rgb_front"])
        np.testing.assert_array_equal(a["proprio"], b["proprio"])
    first_a, first_c = episodes[0][0], episodes[2][0]
    assert not np.array_equal(first_a["proprio"], first_c["proprio"])
    assert not np.array_equal(first_a["rgb_front"], first_c["rgb_front"])


@pytest.mark.parametrize("task", ALL_TASKS)
def test_reset_does_not_leak_between_episodes(task: str) -> None:
    env = make_task(task)
    first, _ = env.reset(seed=11)
    for seed in (12, 13):  # other episodes mutate goals, fixture positions, colours, object poses
        env.reset(seed=seed)
        for _ in range(5):
            env.step(env.action_space.sample())
    again, _ = env.reset(seed=11)
    np.testing.assert_array_equal(first["rgb_front"], again["rgb_front"])
    np.testing.assert_array_equal(first["proprio"], again["proprio"])
    env.close()


@pytest.mark.parametrize("task", ALL_TASKS)
def test_expert_succeeds_on_seeded_episodes(task: str) -> None:
    env = make_task(task)
    results = [run_expert(env, seed) for seed in range(3)]
    env.close()
    assert all(success for success, _ in results), results


@pytest.mark.slow
@pytest.mark.parametrize("task", ALL_TASKS)
def test_expert_success_rate_at_default_noise(task: str) -> None:
    env = make_task(task)
    successes = [run_expert(env, 1000 + seed)[0] for seed in range(50)]
    env.close()
    assert np.mean(successes) >= 0.95, f"{task}: expert success {np.mean(successes):.2f} < 0.95"


def test_renderers_are_created_lazily_and_closed() -> None:
    env = make("reach", render_mode="rgb_array", render_size=96)
    base: TabletopEnv = env.unwrapped
    assert base._renderers == {}
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (96, 96, 3) and frame.dtype == np.uint8
    renderers = list(base._renderers.values())
    assert len(renderers) == 2  # one for the 64 px observation, one for the 96 px video frame
    env.close()
    assert base._renderers == {}
    assert all(r._gl_context is None and r._mjr_context is None for r in renderers)


def test_unused_props_are_parked_and_unit_action_moves_two_centimetres() -> None:
    env = make("reach", terminate_on_success=False)
    env.reset(seed=0)
    base: TabletopEnv = env.unwrapped
    parked = ("block", "cabinet", "button_base", "rack", "plate", "sponge")
    for body in parked:
        assert base.body_pos(body)[1] > 2.0, f"{body} should be parked behind the table in reach"
    before = {body: base.body_pos(body) for body in parked}
    start = base.tcp_pos
    for _ in range(5):
        env.step(np.array([1.0, 0.0, 0.0, 1.0], np.float32))
    assert base.tcp_pos[0] - start[0] == pytest.approx(0.1, abs=0.01)
    for body in parked:  # parked free props float still, without contacts
        np.testing.assert_allclose(base.body_pos(body), before[body], atol=1e-6)
    env.close()


def test_workspace_floor_and_gripper_command() -> None:
    env = make("reach", terminate_on_success=False)
    env.reset(seed=0)
    base: TabletopEnv = env.unwrapped
    for _ in range(15):
        obs, *_ = env.step(np.array([0.0, 0.0, -1.0, -1.0], np.float32))
    assert base.tcp_pos[2] >= WORKSPACE_LOW[2] - 0.003  # fingertips stay off the table
    assert obs["proprio"][8] < 0.005 and obs["proprio"][9] == -1.0  # closed (-1 closes) and last command
    for _ in range(5):
        obs, *_ = env.step(np.array([0.0, 0.0, 0.0, 1.0], np.float32))
    assert obs["proprio"][8] > 0.07  # +1 opens to 8 cm
    env.close()


def test_terminate_on_success_is_configurable() -> None:
    for terminate in (True, False):
        env = make("reach", terminate_on_success=terminate)
        env.reset(seed=0)
        expert = make_expert(env, seed=0)
        expert.reset()
        terminated, info, steps = False, {"success": False}, 0
        while not info["success"]:
            _, _, terminated, _, info = env.step(expert.act())
            steps += 1
        assert terminated is terminate
        if not terminate:
            _, _, terminated, _, info = env.step(expert.act())
            assert not terminated
        env.close()


def test_invalid_arguments_raise_helpful_errors() -> None:
    with pytest.raises(ValueError, match="cameras"):
        make("reach", cameras=("side",))
    with pytest.raises(ValueError, match="image_size"):
        make("reach", image_size=4)
    with pytest.raises(ValueError, match="render_mode"):
        get_spec("reach").load_env_class()(render_mode="depth_array")
    env = make("reach")
    env.reset(seed=0)
    with pytest.raises(ValueError, match="4 finite numbers"):
        env.step(np.array([0.0, np.nan, 0.0, 0.0]))
    with pytest.raises(TypeError, match="TabletopEnv"):
        make_expert(gym.make("CartPole-v1"))
    env.close()


def twin_experts(task: str, seed: int):
    """An env reset at ``seed`` and two experts on it seeded alike and reset: their random streams are in step."""
    env = make(task)
    env.reset(seed=seed)
    experts = make_expert(env, seed=seed), make_expert(env, seed=seed)
    for expert in experts:
        expert.reset()
    return env, *experts


def test_expert_perturb_is_seeded_and_clipped() -> None:
    env, a, b = twin_experts("push", 5)
    clean = a.act()
    np.testing.assert_array_equal(clean, b.act())
    noisy = a.perturb(clean, 0.2)
    np.testing.assert_array_equal(noisy, b.perturb(clean, 0.2))
    assert noisy.dtype == np.float32 and np.all(np.abs(noisy) <= 1.0) and not np.array_equal(noisy, clean)
    assert np.all(np.abs(a.perturb(np.ones(4, np.float32), 5.0)) <= 1.0)
    env.close()


def test_quiet_phases_execute_the_clean_action_and_keep_the_noise_stream() -> None:
    env, quiet, noisy = twin_experts("dish_rack", 3)
    assert {"align", "insert"} <= quiet.quiet_phases, "dish_rack's expert keeps its slot alignment noise-free"
    assert "carry" not in quiet.quiet_phases
    clean = np.array([0.1, -0.2, 0.3, 1.0], np.float32)
    quiet.phase, noisy.phase = "align", "carry"
    np.testing.assert_array_equal(quiet.perturb(clean, 0.5), clean)
    assert not np.array_equal(noisy.perturb(clean, 0.5), clean)
    quiet.phase = "carry"  # the quiet step drew its noise too: both experts' next noisy actions agree
    np.testing.assert_array_equal(quiet.perturb(clean, 0.5), noisy.perturb(clean, 0.5))
    env.close()
