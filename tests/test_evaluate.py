"""Rollout evaluation: Wilson intervals, seeded episodes independent of parallelism, video, real policies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robolora.evaluate import evaluate, wilson_interval
from robolora.policies import PolicyConfig, VisuomotorPolicy


class ProportionalReacher:
    """A hand-written closed-loop policy: moves the gripper down-forward until the episode ends.

    Deterministic given the observation, so results must not depend on how episodes are batched.
    """

    def reset(self) -> None:
        self.calls = 0

    def select_action(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        self.calls += 1
        proprio = np.asarray(obs["proprio"])
        action = np.zeros((proprio.shape[0], 4), dtype=np.float32)
        action[:, 0] = np.tanh(proprio[:, 1] * 10)  # depends on the state: differs across seeds
        action[:, 2] = -0.5
        return action


def test_wilson_interval_matches_known_values():
    low, high = wilson_interval(45, 50)
    assert low == pytest.approx(0.7864, abs=1e-3) and high == pytest.approx(0.9565, abs=1e-3)
    assert wilson_interval(0, 50)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(50, 50)[1] == pytest.approx(1.0, abs=1e-12)
    assert wilson_interval(0, 50)[1] == pytest.approx(0.0713, abs=1e-3)
    # the bounds hold the rate exactly at 0 and 1 (a plotted error bar rate - low or high - rate never goes negative)
    assert all(wilson_interval(n, n)[1] == 1.0 and wilson_interval(0, n)[0] == 0.0 for n in range(1, 201))


def test_results_do_not_depend_on_parallel_envs():
    serial = evaluate(ProportionalReacher(), "robolora/Reach-v0", 3, seed=5, num_envs=1)
    parallel = evaluate(ProportionalReacher(), "robolora/Reach-v0", 3, seed=5, num_envs=2)
    assert serial["episodes"] == parallel["episodes"]
    assert [e["seed"] for e in serial["episodes"]] == [5, 6, 7]
    assert all(1 <= e["length"] <= 50 for e in serial["episodes"])
    assert serial["eval/ci_low"] <= serial["eval/success_rate"] <= serial["eval/ci_high"]


def test_visuomotor_policy_rolls_out_and_writes_a_gif(tmp_path):
    torch.manual_seed(0)
    policy = VisuomotorPolicy(PolicyConfig.preset("tiny")).eval()
    m = evaluate(policy, "robolora/Reach-v0", 1, task_id=0, video_path=tmp_path / "reach.gif")
    assert m["eval/episodes"] == 1 and m["eval/latency_ms_p50"] > 0
    from PIL import Image

    with Image.open(m["video"]) as gif:
        assert gif.n_frames == m["episodes"][0]["length"] + 1
        assert gif.size[0] > 64, "videos are rendered at render_size, not the policy's 64 px"


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="episodes"):
        evaluate(ProportionalReacher(), "robolora/Reach-v0", 0)
    with pytest.raises(ValueError, match=r"\.gif or \.mp4"):
        evaluate(ProportionalReacher(), "robolora/Reach-v0", 1, video_path=tmp_path / "x.avi")
