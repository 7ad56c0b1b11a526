"""The episode runner (robolora/episodes.py): seeds, success and lengths on one env and on vector envs, the hooks,
frames, Wilson intervals and latency percentiles; and the four loops built on it giving the numbers they gave
before it existed."""

from __future__ import annotations

import math
import time

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from robolora.episodes import Episode, Tick, episode_metrics, play_episodes, rate_metrics, timing_metrics
from robolora.stats import wilson_interval

HORIZON = 4


class Countdown(gym.Env):
    """Seed s succeeds (and terminates) at step ``1 + s % 5`` when every action so far was positive; the time limit
    of ``HORIZON`` steps truncates the others. Observation: the steps taken, as (1,) float32."""

    metadata = {"render_modes": ["rgb_array"]}
    observation_space = spaces.Box(0, HORIZON, (1,), np.float32)
    action_space = spaces.Box(-1, 1, (1,), np.float32)
    render_mode = "rgb_array"

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.target, self.steps, self.ok = 1 + (seed or 0) % 5, 0, True  # autoresets come unseeded
        return self._obs(), {"success": False}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        assert np.asarray(action).dtype == np.float32
        self.steps += 1
        self.ok &= bool(np.asarray(action).reshape(-1)[0] > 0)
        success = self.ok and self.steps == self.target
        return self._obs(), float(success), success, self.steps >= HORIZON and not success, {"success": success}

    def render(self) -> np.ndarray:
        return np.full((2, 2, 3), self.steps, dtype=np.uint8)

    def _obs(self) -> np.ndarray:
        return np.array([self.steps], dtype=np.float32)


def forward(obs: np.ndarray) -> np.ndarray:
    return np.ones_like(obs)  # (1,) or (n, 1): always positive


def expected(seeds: range) -> list[tuple[int, bool, int]]:
    return [(s, 1 + s % 5 <= HORIZON, min(1 + s % 5, HORIZON)) for s in seeds]


def outcomes(episodes: list[dict]) -> list[tuple[int, bool, int]]:
    return [(e["seed"], e["success"], e["length"]) for e in episodes]


def test_episode_i_runs_on_seed_plus_i_and_succeeds_when_info_says_so() -> None:
    run = play_episodes(Countdown(), forward, 7, seed=10)
    assert outcomes(run.episodes) == expected(range(10, 17))
    assert len(run.act_s) == len(run.tick_s) == sum(e["length"] for e in run.episodes)
    assert all(tick >= act > 0 for act, tick in zip(run.act_s, run.tick_s))
    never = play_episodes(Countdown(), lambda obs: -forward(obs), 3, seed=10)
    assert outcomes(never.episodes) == [(s, False, HORIZON) for s in range(10, 13)]


@pytest.mark.parametrize("num_envs", [1, 2, 3])
def test_vector_envs_give_the_single_env_results(num_envs: int) -> None:
    """7 episodes in waves of num_envs (the last one padded), steps batched: the same seeds, successes, lengths."""
    envs = gym.vector.SyncVectorEnv([Countdown for _ in range(num_envs)])
    shapes = set()

    def act(obs: np.ndarray) -> np.ndarray:
        shapes.add(obs.shape)
        return forward(obs)

    run = play_episodes(envs, act, 7, seed=10)
    envs.close()
    assert outcomes(run.episodes) == expected(range(10, 17))
    assert shapes == {(num_envs, 1)}


def test_hooks_see_each_episode_start_and_end_once_and_add_fields() -> None:
    envs = gym.vector.SyncVectorEnv([Countdown for _ in range(2)])
    started: list[int] = []
    ended: list[tuple[int, int]] = []
    done: list[int] = []

    def on_reset(episodes: list[Episode], info: dict) -> None:
        started.extend(e.seed for e in episodes)
        for e in episodes:
            e.fields["ticks_seen"] = 0

    def on_step(tick: Tick) -> None:
        assert not (tick.ended & tick.running).any()
        for e, end, before in zip(tick.episodes, tick.ended, tick.running | tick.ended):
            e.fields["ticks_seen"] += int(before)
            if end:
                ended.append((e.seed, e.length))

    run = play_episodes(envs, forward, 3, seed=3, on_reset=on_reset, on_step=on_step, progress=done.append)
    envs.close()
    assert started == [3, 4, 5], "the padding env of the last wave runs no counted episode"
    assert sorted(ended) == [(e["seed"], e["length"]) for e in run.episodes]
    assert all(e["ticks_seen"] == e["length"] for e in run.episodes)
    assert done == [1, 2, 3]


def test_frames_record_the_first_episode_after_reset_and_each_step() -> None:
    env = Countdown()
    run = play_episodes(env, forward, 2, seed=2, render=env.render)
    assert [int(f[0, 0, 0]) for f in run.frames] == [0, 1, 2, 3]  # seed 2: success at step 3
    assert play_episodes(env, forward, 1, seed=2).frames == []


def test_metrics_carry_the_wilson_interval_and_mean_length() -> None:
    run = play_episodes(Countdown(), forward, 5, seed=0)  # seeds 0..4: the last one times out
    m = run.metrics("eval")
    low, high = wilson_interval(4, 5)
    assert m == {"eval/success_rate": 0.8, "eval/ci_low": low, "eval/ci_high": high, "eval/mean_length": 2.8,
                 "eval/episodes": 5}
    assert m["eval/ci_low"] <= m["eval/success_rate"] <= m["eval/ci_high"]
    assert rate_metrics("x/stage0", 0, 3) == {"x/stage0/success_rate": 0.0, "x/stage0/ci_low": 0.0,
                                              "x/stage0/ci_high": wilson_interval(0, 3)[1]}
    with pytest.raises(ValueError, match="no episodes"):
        episode_metrics("eval", [])


def test_timing_metrics_have_p50_p99_max_in_the_unit_asked() -> None:
    seconds = [0.001 * (i + 1) for i in range(100)]
    ms = timing_metrics("control/policy", seconds, "ms")
    assert list(ms) == ["control/policy_ms_p50", "control/policy_ms_p99", "control/policy_ms_max"]
    assert ms["control/policy_ms_p50"] == pytest.approx(50.5) and ms["control/policy_ms_p99"] == pytest.approx(99.01)
    assert ms["control/policy_ms_max"] == pytest.approx(100.0)
    assert timing_metrics("rollout/switch", [2e-6], "us") == pytest.approx(
        {"rollout/switch_us_p50": 2.0, "rollout/switch_us_p99": 2.0, "rollout/switch_us_max": 2.0})
    assert all(math.isnan(v) for v in timing_metrics("rollout/switch", [], "us").values())


def test_bad_episode_count_is_refused() -> None:
    with pytest.raises(ValueError, match="episodes=0"):
        play_episodes(Countdown(), forward, 0, seed=0)


# ------------------------------------------------------------------------------------------ the four callers
class FakeController:
    """The Controller's interface over ``forward`` (no bundle): checks nothing, never faults."""

    fault_count = 0

    def check_env(self, observation_space: spaces.Space, action_space: spaces.Space) -> None:
        pass

    def reset(self) -> None:
        pass

    def select_action(self, obs: np.ndarray) -> np.ndarray:
        return forward(obs)


def test_controller_loop_counts_and_paces_on_the_runner() -> None:
    from robolora.controller import run_episodes

    m = run_episodes(Countdown(), FakeController(), 5, seed=0)
    assert outcomes(m["episodes"]) == expected(range(5))
    assert all(e["faults"] == 0 and e["deadline_misses"] == 0 for e in m["episodes"])
    assert m["control/ticks"] == 14 and m["control/success_rate"] == 0.8 and m["control/hz"] == 0.0
    assert m["control/tick_ms_p99"] >= m["control/policy_ms_p50"] > 0
    t0 = time.perf_counter()
    paced = run_episodes(Countdown(), FakeController(), 1, hz=50.0, seed=4)  # 4 ticks: 3 deadlines waited for
    assert time.perf_counter() - t0 >= 3 / 50 and paced["control/deadline_misses"] == 0
    rushed = run_episodes(Countdown(), FakeController(), 1, hz=1e7, seed=4)
    assert rushed["control/deadline_misses"] == 3, "every non-final tick of 0.1 us is late"


class GoalSeeker:
    """P-control toward the Reach goal of the next seed (read from its own env), 6 cm beside it on odd seeds, with
    capped speed: mixed successes and lengths. ``reset()`` moves to the next seed, as every caller resets the policy
    once per episode when episodes run one at a time."""

    def __init__(self, seed: int) -> None:
        from robolora.envs import make

        self.env, self.seed, self.target = make("robolora/Reach-v0"), seed - 1, np.zeros(3)

    def reset(self, indices: list[int] | None = None) -> None:
        self.seed += 1
        self.env.reset(seed=self.seed)
        self.target = self.env.unwrapped.goal + (0.0 if self.seed % 2 == 0 else np.array([0.06, 0.0, 0.0]))

    def select_action(self, obs: dict) -> np.ndarray:
        tcp = np.asarray(obs["proprio"])[..., :3]
        action = np.ones((*tcp.shape[:-1], 4), dtype=np.float32)
        action[..., :3] = np.clip((self.target - tcp) / 0.02, -0.4, 0.4)
        return action


class ControllerSeeker(GoalSeeker, FakeController):
    pass


def test_the_four_loops_give_the_numbers_they_gave_before_the_runner() -> None:
    """Reach seeds 5-7 with GoalSeeker, measured with the loops before they shared the runner (commit 38efdd7),
    and the kitchen's scripted stage experts through the skill rollout."""
    from stable_baselines3.common.vec_env import DummyVecEnv
    from test_rollout import ScriptedManager

    from robolora.controller import run_episodes
    from robolora.envs import make
    from robolora.evaluate import evaluate
    from robolora.rollout import rollout
    from robolora.sb3 import SB3SkillPolicy, evaluate_sb3

    before = [(5, False, 50), (6, True, 38), (7, False, 50)]
    low, high = 0.06149194402093078, 0.7923404011921757
    reach = "robolora/Reach-v0"
    results = {
        "evaluate": evaluate(GoalSeeker(5), reach, 3, seed=5),
        "controller": run_episodes(make(reach), ControllerSeeker(5), 3, seed=5),
        "sb3": evaluate_sb3(SB3SkillPolicy(GoalSeeker(5)), reach, 3, seed=5, n_envs=1, vec_env_cls=DummyVecEnv),
    }
    for name, m in results.items():
        prefix = "control" if name == "controller" else "eval"
        assert outcomes(m["episodes"]) == before, name
        assert (m[f"{prefix}/ci_low"], m[f"{prefix}/ci_high"], m[f"{prefix}/mean_length"]) == (low, high, 46.0), name
    assert results["controller"]["control/ticks"] == 138
    env = make("kitchen")
    m = rollout(ScriptedManager(env), ["wipe", "dish_rack"], episodes=2, seed=3, env=env)
    env.close()
    assert outcomes(m["episodes"]) == [(3, True, 116), (4, True, 124)]
    assert [e["switch_ticks"] for e in m["episodes"]] == [[45], [59]] and m["rollout/switches"] == 4
    assert m["rollout/stage1/dish_rack/ci_low"] == 0.3423802239546494 and m["rollout/mean_length"] == 120.0
