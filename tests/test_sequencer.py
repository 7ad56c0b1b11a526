"""Skill sequences on the torch-free controller (robolora/sequencer.py): the learned, schedule and command drivers
switch where they should, a skill that never completes times out into a safe hold, switches are scored against the
env's stage success, and bad arguments are refused before anything runs.

The completion heads are hand-made: ``add_done_head`` appends a "done" output to a skill's exported graph that reads
the camera's mean brightness (times ``gain``), so a test sets the signal through the image it feeds.
"""

from __future__ import annotations

import json
import shutil
import threading

import gymnasium as gym
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from robolora.cli import main as cli_main
from robolora.controller import BundleError, control_main, load_bundle, run_episodes, sha256_file
from robolora.envs import make
from robolora.export import export_skills
from robolora.sequencer import Sequencer, stage_success_planner
from test_adapters import tiny
from test_controller import REACH, two_skills

COMPLETION = {"threshold": 0.5, "k": 3, "timeout_ticks": 40, "output": "done"}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The tiny wipe-then-dish_rack bundle, without completion heads."""
    root = tmp_path_factory.mktemp("sequencer")
    export_skills(tiny(), two_skills(root), root / "plain", env_id=REACH, sequence=["wipe", "dish_rack"])
    return root / "plain"


def add_done_head(bundle, skill: str, gain: float = 1.0, **completion) -> None:
    """Give ``skill`` a completion head: done = gain * mean(rgb_front) / 255, (B,); re-seal the checksums."""
    folder = bundle / "skills" / skill
    model = onnx.load(str(folder / "policy.onnx"))
    graph = model.graph
    graph.node.extend([
        helper.make_node("Cast", ["rgb_front"], ["head_pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["head_pixels"], ["head_mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Constant", [], ["head_gain"], value=helper.make_tensor("g", TensorProto.FLOAT, [],
                                                                               [gain / 255.0])),
        helper.make_node("Mul", ["head_mean", "head_gain"], ["done"]),
    ])
    graph.output.append(helper.make_tensor_value_info("done", TensorProto.FLOAT, ["batch"]))
    onnx.save(model, str(folder / "policy.onnx"))
    meta = json.loads((folder / "policy.json").read_text())
    meta["completion"] = {**COMPLETION, **completion}
    meta["files"]["policy.onnx"] = {"sha256": sha256_file(folder / "policy.onnx"),
                                    "bytes": (folder / "policy.onnx").stat().st_size}
    (folder / "policy.json").write_text(json.dumps(meta))
    index = json.loads((bundle / "skills.json").read_text())
    for name in ("policy.onnx", "policy.json"):
        index["files"][f"skills/{skill}/{name}"] = {"sha256": sha256_file(folder / name)}
    (bundle / "skills.json").write_text(json.dumps(index))


def with_heads(plain, tmp_path, gains=None, **completion):
    bundle = shutil.copytree(plain, tmp_path / "heads")
    for skill, gain in (gains or {"wipe": 1.0, "dish_rack": 1.0}).items():
        add_done_head(bundle, skill, gain, **completion)
    return bundle


def lit(brightness: float) -> dict[str, np.ndarray]:
    """A Reach-shaped observation whose camera reads ``brightness`` (0..1) everywhere."""
    return {"rgb_front": np.full((64, 64, 3), round(255 * brightness), dtype=np.uint8),
            "proprio": np.zeros(10, dtype=np.float32)}


class StagedEnv(gym.Env):
    """Reach's spaces, two stages: stage 0 succeeds from step ``stage0_at``, stage 1 ``stage1_after`` steps later
    (never when None); the camera's brightness at step t is ``brightness(seed, t)``; ``length`` steps at most."""

    def __init__(self, brightness, stage0_at: int, stage1_after: int | None = None, length: int = 30) -> None:
        reach = make(REACH)
        self.observation_space, self.action_space = reach.observation_space, reach.action_space
        reach.close()
        self.brightness, self.stage0_at, self.stage1_after, self.length = brightness, stage0_at, stage1_after, length
        self.actions: list[np.ndarray] = []

    def _state(self):
        stages = (self.t >= self.stage0_at,
                  self.stage1_after is not None and self.t >= self.stage0_at + self.stage1_after)
        return lit(self.brightness(self.seed, self.t)), {"stage_success": stages, "success": all(stages)}

    def reset(self, *, seed=None, options=None):
        self.seed, self.t = seed, 0
        return self._state()

    def step(self, action):
        self.t += 1
        self.actions.append(np.array(action))
        obs, info = self._state()
        return obs, 0.0, info["success"], self.t >= self.length, info


def drive(sequencer, brightness) -> list[str]:
    """Step the sequencer on observations of the given brightness; the skill that acted at each tick."""
    acted = []
    for b in brightness:
        sequencer.select_action(lit(b))
        acted.append(sequencer.controller.active)
    return acted


def test_learned_switch_after_k_ticks_at_or_above_the_threshold(plain, tmp_path):
    controller = load_bundle(with_heads(plain, tmp_path))
    sequencer = Sequencer(controller, switch="learned")
    assert sequencer.rules[0].threshold == 0.5 and sequencer.rules[0].k == 3
    acted = drive(sequencer, [0.2, 0.9, 0.9, 0.2, 0.9, 0.9, 0.9, 0.2])
    assert acted == ["wipe"] * 7 + ["dish_rack"], "three ticks at >= 0.5 (ticks 4-6): dish_rack from tick 7"
    assert sequencer.stage == 1 and sequencer.switches[0]["tick"] == 7
    assert controller.completion is not None and not np.isnan(controller.completion).any(), \
        "the head is evaluated at every tick, also at ticks served from wipe's chunk queue"
    drive(sequencer, [0.8, 0.8, 0.8])
    assert sequencer.status == "finished"
    held = sequencer.select_action(lit(0.8))
    assert np.array_equal(held[:3], [0, 0, 0]), "a finished sequence holds"
    going = Sequencer(controller, switch="learned", finish="continue")
    drive(going, [0.9] * 6)
    assert going.status == "finished" and going.active == "dish_rack"
    acted = going.select_action(lit(0.9))
    assert not np.array_equal(acted[:3], [0, 0, 0]) and controller.active == "dish_rack", \
        "finish='continue': the last skill acts on"
    with pytest.raises(ValueError, match="finish="):
        Sequencer(controller, finish="stop")


def test_threshold_and_k_overrides(plain, tmp_path):
    controller = load_bundle(with_heads(plain, tmp_path))
    assert drive(Sequencer(controller, k=1), [0.2, 0.6, 0.2]) == ["wipe", "wipe", "dish_rack"]
    strict = Sequencer(controller, threshold=0.95, k=1)
    assert drive(strict, [0.9] * 5) == ["wipe"] * 5 and strict.rules[0].threshold == 0.95


def test_a_skill_that_never_completes_times_out_into_a_safe_hold(plain, tmp_path):
    bundle = with_heads(plain, tmp_path, gains={"wipe": 0.0, "dish_rack": 1.0}, timeout_ticks=6)
    controller = load_bundle(bundle)
    env = StagedEnv(lambda seed, t: 1.0, stage0_at=1000, length=12)
    m = run_episodes(env, controller, episodes=2, seed=0, sequencer=Sequencer(controller))
    assert m["control/timeouts"] == 2 == m["control/timeouts/wipe"] and m["control/timeouts/dish_rack"] == 0
    episode = m["episodes"][0]
    assert episode["unfinished"] == "wipe" and episode["switch_ticks"] == [] and not episode["finished"]
    actions = np.stack(env.actions[:12])
    assert np.abs(actions[:6, :3]).max() > 0, "wipe acts for its 6 ticks"
    assert np.array_equal(actions[6:, :3], np.zeros((6, 3))) and np.all(actions[6:, 3] == actions[5, 3]), \
        "then zero motion with the gripper keeping its last command"
    assert m["control/stage0/wipe/success_rate"] == 0.0 and m["control/missed_switches"] == 0
    with_override = Sequencer(controller, timeout=2)
    drive(with_override, [0.0, 0.0])
    assert with_override.unfinished == "wipe"


def test_schedule_switches_at_the_given_ticks(plain):
    controller = load_bundle(plain)
    sequencer = Sequencer(controller, switch="schedule", schedule=[3])
    assert drive(sequencer, [0.5] * 6) == ["wipe"] * 3 + ["dish_rack"] * 3
    sequencer.reset()
    assert drive(sequencer, [0.5] * 4) == ["wipe"] * 3 + ["dish_rack"], "every episode starts with the first skill"


def test_command_switches_from_another_thread_are_followed(plain):
    controller = load_bundle(plain)
    sequencer = Sequencer(controller, switch="command")
    drive(sequencer, [0.5] * 3)
    planner = threading.Thread(target=controller.activate, args=("dish_rack",))
    planner.start()
    planner.join()
    assert drive(sequencer, [0.5] * 2) == ["dish_rack"] * 2
    assert sequencer.stage == 1 and sequencer.switches[0]["tick"] == 3
    controller.activate("wipe")  # back to a stage already left: outside the sequence, counted
    drive(sequencer, [0.5])
    assert sequencer.off_sequence == 1 and sequencer.stage == 1


def test_the_stage_success_planner_switches_at_the_stage_boundary(plain):
    controller = load_bundle(plain)
    env = StagedEnv(lambda seed, t: 0.5, stage0_at=5, stage1_after=4)
    sequencer = Sequencer(controller, switch="command", planner=stage_success_planner)
    m = run_episodes(env, controller, episodes=2, seed=0, sequencer=sequencer)
    assert [e["switch_ticks"] for e in m["episodes"]] == [[5], [5]], "the next skill acts at the tick after success"
    assert m["control/success_rate"] == 1.0 and m["control/stage1/dish_rack/success_rate"] == 1.0
    assert m["control/premature_switches"] == 0 and m["control/late_switches"] == 0
    assert m["control/switch_lag_ticks_max"] == 0 and m["control/switches"] == 2
    assert 0 < m["control/switch_us_p50"] <= m["control/switch_us_p99"] <= m["control/switch_us_max"] < 1e4
    assert m["control/switch_deadline_misses"] == 0


def test_premature_and_late_learned_switches_are_counted(plain, tmp_path):
    """Stage 0 succeeds at step 10. Seed 0's head fires from tick 4 (premature); seed 1's from tick 12, two ticks
    after success, so with k=3 the next skill starts 5 ticks after success (late: more than k)."""
    controller = load_bundle(with_heads(plain, tmp_path))
    env = StagedEnv(lambda seed, t: float(t >= (4 if seed == 0 else 12)), stage0_at=10, length=20)
    m = run_episodes(env, controller, episodes=2, seed=0, sequencer=Sequencer(controller))
    first, second = m["episodes"]
    assert first["switch_ticks"] == [7] and first["premature"] == 1 and first["late"] == 0
    assert second["switch_ticks"] == [15] and second["premature"] == 0 and second["lag_ticks"] == [5]
    assert second["late"] == 1 and m["control/late_switches"] == 1 and m["control/premature_switches"] == 1
    assert m["control/stage0/wipe/success_rate"] == 1.0
    # dish_rack's head fires too (the same bright frames) but its stage never succeeds: two premature finishes
    assert first["finished"] and first["premature_finish"] and m["control/premature_finishes"] == 2


def test_bad_sequences_are_refused_before_anything_runs(plain, tmp_path):
    controller = load_bundle(plain)
    with pytest.raises(ValueError, match=r"\['pour'\] that bundle .* lacks; it has \['wipe', 'dish_rack'\]"):
        Sequencer(controller, ["wipe", "pour"])
    with pytest.raises(ValueError, match=r"learned.*\['wipe'\] of bundle .* have none"):
        Sequencer(controller, switch="learned")
    with pytest.raises(ValueError, match="does not allow the switch dish_rack -> wipe"):
        Sequencer(controller, ["dish_rack", "wipe"], switch="schedule", schedule=[4])
    with pytest.raises(ValueError, match="increasing ticks"):
        Sequencer(controller, switch="schedule", schedule=[0])
    with pytest.raises(ValueError, match="switch="):
        Sequencer(controller, switch="never")
    only_wipe = with_heads(plain, tmp_path, gains={"wipe": 1.0})
    Sequencer(load_bundle(only_wipe), switch="learned")  # the last skill needs no head
    for kwargs, match in (({"sequence": ["wipe", "pour"]}, "lacks"), ({"switch": "learned"}, "have none")):
        with pytest.raises(ValueError, match=match):
            control_main(plain, "robolora/Nowhere-v0", episodes=1, **kwargs)  # refused before the env is made


def test_control_cli_errors_name_the_fix(plain, tmp_path, capsys):
    assert cli_main(["control", "--bundle", str(plain), "--env", "reach", "--sequence", "wipe,pour"]) == 2
    assert "['wipe', 'dish_rack']" in capsys.readouterr().err
    assert cli_main(["control", "--bundle", str(plain), "--env", "reach", "--switch", "learned"]) == 2
    assert "['wipe'] of bundle" in capsys.readouterr().err
    tampered = shutil.copytree(plain, tmp_path / "tampered")
    (tampered / "skills" / "wipe" / "policy.onnx").write_bytes(b"not a graph")
    assert cli_main(["control", "--bundle", str(tampered), "--env", "reach", "--switch", "command"]) == 2
    assert "does not match its checksum" in capsys.readouterr().err
    with pytest.raises(BundleError):
        load_bundle(tampered)


def test_torch_rollout_and_controller_switch_on_the_same_learned_tick(tmp_path):
    """A trained-style completion head (robolora.completion) travels from the adapter folder into the bundle's
    "done" output; the torch rollout and the torch-free sequencer switch at the same tick and count the same
    premature switch (the head is sure from the first tick, the stage succeeds at step 10)."""
    import dataclasses

    import torch

    from robolora.adapters import load_adapter, save_adapter
    from robolora.completion import Completion, CompletionHead
    from robolora.rollout import rollout

    wipe, dish = two_skills(tmp_path)
    head = CompletionHead(32, hidden=0)
    with torch.no_grad():
        head.fc2.weight.zero_()
        head.fc2.bias.fill_(3.0)  # probability 0.95 whatever it sees
    save_adapter(dataclasses.replace(load_adapter(wipe), completion=Completion(head, 0.5, k=3, timeout_ticks=50)),
                 wipe)
    export_skills(tiny(), [wipe, dish], tmp_path / "bundle", env_id=REACH)
    staged = lambda: StagedEnv(lambda seed, t: 0.5, stage0_at=10, length=12)  # noqa: E731
    torch_side = rollout(tiny(), [wipe, dish], episodes=1, seed=0, switch="learned", env=staged())
    controller = load_bundle(tmp_path / "bundle")
    assert controller.skill_spec("wipe").completion.k == 3 and controller.skill_spec("dish_rack").completion is None
    deployed = run_episodes(staged(), controller, episodes=1, seed=0, sequencer=Sequencer(controller))
    assert torch_side["episodes"][0]["switch_ticks"] == deployed["episodes"][0]["switch_ticks"] == [3]
    assert torch_side["rollout/premature_switches"] == deployed["control/premature_switches"] == 1
    assert torch_side["rollout/completion_ms_p50"] > 0


def test_info_describes_a_multi_skill_bundle(plain, tmp_path, capsys):
    only_wipe = with_heads(plain, tmp_path, gains={"wipe": 1.0})
    assert cli_main(["info", str(only_wipe), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "multi-skill bundle" and list(info["skills"]) == ["wipe", "dish_rack"]
    assert info["index"]["sequence"] == ["wipe", "dish_rack"] and "files" not in info["index"]
    assert info["skills"]["wipe"]["completion"]["threshold"] == COMPLETION["threshold"]
    assert info["skills"]["wipe"]["outputs"] == ["actions", "done"] and info["skills"]["dish_rack"]["completion"] is None
    assert cli_main(["info", str(only_wipe)]) == 0
    text = capsys.readouterr().out
    assert "wipe -> dish_rack" in text and "threshold 0.5, k 3, timeout 40 ticks" in text
    assert "dish_rack head" in text and "no completion head" in text


def test_rollout_cli_chains_skills_in_any_env_oracle_or_learned(tmp_path, capsys):
    """`robolora rollout --env reach --switch learned` switches on the adapters' completion heads in an env without
    stages; the oracle (--switch success, the default) needs an env that reports them and says so."""
    import dataclasses

    import torch

    import robolora
    from robolora.adapters import load_adapter, save_adapter
    from robolora.completion import Completion, CompletionHead
    from robolora.policies import save_policy

    assert robolora.Sequencer is Sequencer and robolora.export_skills is export_skills
    wipe, dish = two_skills(tmp_path)
    head = CompletionHead(32, hidden=0)
    with torch.no_grad():
        head.fc2.weight.zero_()
        head.fc2.bias.fill_(3.0)  # always sure: switches after k = 2 ticks
    save_adapter(dataclasses.replace(load_adapter(wipe), completion=Completion(head, 0.5, k=2, timeout_ticks=50)),
                 wipe)
    save_policy(tiny(), tmp_path / "base")
    args = ["rollout", "--base", str(tmp_path / "base"), "--skills", f"{wipe},{dish}", "--env", "reach",
            "--episodes", "1", "--seed", "0"]
    assert cli_main([*args, "--switch", "learned", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["skills"] == ["wipe", "dish_rack"] and m["episodes"][0]["switch_ticks"] == [2]
    assert "rollout/premature_switches" not in m or m["rollout/premature_switches"] == 0
    assert cli_main(args) == 2
    assert "stage_success" in capsys.readouterr().err
