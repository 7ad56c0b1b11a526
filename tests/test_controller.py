"""The torch-free controller: refuses bad bundles before any step, holds safely on bad observations and keeps
going, acts exactly like the torch policy's select_action, keeps its rate, and runs where torch cannot import;
multi-skill bundles: every skill checked and loaded, switches whole at the next tick from any thread."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import gymnasium as gym
import numpy as np
import pytest
import torch

from robolora import evaluate as torch_evaluate
from robolora.adapters import attach_for_eval, save_adapter
from robolora.controller import BundleError, load_bundle, run_episodes
from robolora.stats import EVAL_SEED
from robolora.envs import make
from robolora.export import export_bundle, export_skills
from robolora.policies import PolicyConfig, VisuomotorPolicy
from test_adapters import tiny, trained_adapter

REACH = "robolora/Reach-v0"


@pytest.fixture(scope="module")
def skill(tmp_path_factory):
    """(bundle folder, adapter folder) of the tiny policy + trained wipe adapter, recorded for Reach's spaces."""
    root = tmp_path_factory.mktemp("controller")
    save_adapter(trained_adapter(), root / "adapter")
    export_bundle(tiny(), root / "adapter", root / "bundle", env_id=REACH)
    return root / "bundle", root / "adapter"


def _copy(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / "copy")


class CountSteps(gym.Wrapper):
    def __init__(self, env):
        super().__init__(env)
        self.steps = 0
        self.actions = []

    def step(self, action):
        self.steps += 1
        self.actions.append(np.array(action))
        return self.env.step(action)


@pytest.mark.parametrize("name", ["policy.onnx", "policy.pt2", "model.safetensors", "policy.json"])
def test_missing_file_is_named(skill, tmp_path, name):
    bundle = _copy(skill[0], tmp_path)
    (bundle / name).unlink()
    with pytest.raises(BundleError, match=f"missing.*{name}"):
        load_bundle(bundle)


@pytest.mark.parametrize("name", ["model.safetensors", "policy.onnx"])
def test_checksum_mismatch_is_refused(skill, tmp_path, name):
    bundle = _copy(skill[0], tmp_path)
    data = bytearray((bundle / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{name} does not match its checksum"):
        load_bundle(bundle)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(format_version=99), "version 99"),
    (lambda m: m["chunking"].update(n_action_steps=9), "n_action_steps=9"),
    (lambda m: m.pop("action"), "missing or malformed field"),
    (lambda m: m.update(inputs=["proprio", "rgb_front"]), "inputs"),
])
def test_inconsistent_spec_is_refused(skill, tmp_path, edit, match):
    bundle = _copy(skill[0], tmp_path)
    meta = json.loads((bundle / "policy.json").read_text())
    edit(meta)
    (bundle / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=match):
        load_bundle(bundle)


def test_spec_not_matching_the_env_fails_before_the_loop(skill):
    controller = load_bundle(skill[0])
    env = CountSteps(make(REACH, image_size=32))
    with pytest.raises(BundleError, match=r"rgb_front.*\(32, 32, 3\).*image_size=64"):
        run_episodes(env, controller, episodes=1)
    assert env.steps == 0
    base = export_bundle(tiny(), None, skill[0].parent / "base", env_id=REACH)["path"]
    with pytest.raises(BundleError, match="takes a task id"):
        run_episodes(make(REACH), load_bundle(base), episodes=1)


class BadObservations(gym.ObservationWrapper):
    """Corrupts the observation returned by the given env steps."""

    KINDS = {3: "nan", 6: "shape", 9: "dtype", 12: "missing", 15: "inf_image_ok_proprio_out_of_bounds"}

    def __init__(self, env):
        super().__init__(env)
        self.t = 0

    def reset(self, **kwargs):
        self.t = 0
        return super().reset(**kwargs)

    def step(self, action):
        self.t += 1
        return super().step(action)

    def observation(self, obs):
        obs = {k: v.copy() for k, v in obs.items()}
        kind = self.KINDS.get(self.t)
        if kind == "nan":
            obs["proprio"][2] = np.nan
        elif kind == "shape":
            obs["rgb_front"] = obs["rgb_front"][:32]
        elif kind == "dtype":
            obs["proprio"] = obs["proprio"].astype(np.float64)
        elif kind == "missing":
            del obs["rgb_front"]
        elif kind is not None:
            obs["proprio"][0] = 5.0
        return obs


def test_bad_observations_are_held_counted_and_the_loop_continues(skill):
    controller = load_bundle(skill[0])
    env = CountSteps(BadObservations(make(REACH, terminate_on_success=False)))
    result = run_episodes(env, controller, episodes=1, seed=3)
    assert result["control/faults"] == len(BadObservations.KINDS) == controller.faults["observation"]
    assert result["episodes"][0]["length"] == 50 == env.steps, "the episode must run to its time limit"
    actions = np.stack(env.actions)
    for t in BadObservations.KINDS:  # the observation after step t is the input of action t (0-based)
        assert np.array_equal(actions[t, :3], [0, 0, 0]), t
        assert actions[t, 3] == actions[t - 1, 3], "the gripper keeps its last command"
    good = [t for t in range(50) if t not in BadObservations.KINDS]
    assert np.abs(actions[good, :3]).max() > 0, "good observations must still be acted on"
    assert np.all(np.abs(actions) <= 1.0)


def test_hold_before_any_action_is_the_stop_action(skill):
    controller = load_bundle(skill[0])
    obs = make(REACH).reset(seed=0)[0]
    obs["proprio"] = obs["proprio"] * np.nan
    assert np.array_equal(controller.select_action(obs), [0, 0, 0, 1])
    assert controller.fault_count == 1


def test_non_finite_model_output_is_a_held_fault(skill, monkeypatch):
    controller = load_bundle(skill[0])
    obs = make(REACH).reset(seed=0)[0]
    first = controller.select_action(obs)
    monkeypatch.setattr(controller, "predict_chunk", lambda inputs: np.full((1, 8, 4), np.nan, np.float32))
    controller.reset()
    assert np.array_equal(controller.select_action(obs), [0, 0, 0, 1])
    assert controller.faults == {"observation": 0, "output": 1}
    monkeypatch.undo()
    assert np.array_equal(controller.select_action(obs), first), "the next good step re-queries the model"


def test_actions_are_clamped_to_the_recorded_limits(skill, tmp_path):
    bundle = _copy(skill[0], tmp_path)
    meta = json.loads((bundle / "policy.json").read_text())
    meta["action"].update(low=[-0.01] * 4, high=[0.01] * 4, stop=[0.0] * 4)
    (bundle / "policy.json").write_text(json.dumps(meta))
    controller = load_bundle(bundle)
    obs = make(REACH).reset(seed=0)[0]
    actions = np.stack([controller.select_action(obs) for _ in range(8)])
    assert np.abs(actions).max() == pytest.approx(0.01)


def _observations(env_id: str, n_envs: int, steps: int, seed: int):
    envs = [make(env_id) for _ in range(n_envs)]
    obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        yield {k: np.stack([o[k] for o in obs]) for k in obs[0]}
        obs = [env.step(rng.uniform(-1, 1, 4).astype(np.float32))[0] for env in envs]


@pytest.mark.parametrize("ensemble", [False, True])
def test_select_action_equals_the_torch_policy(skill, tmp_path, ensemble):
    if ensemble:
        torch.manual_seed(0)
        policy = VisuomotorPolicy(PolicyConfig.preset("tiny", n_action_steps=1, temporal_ensemble=0.3)).eval()
        controller = load_bundle(export_bundle(policy, None, tmp_path / "ens", env_id=REACH)["path"], task_id=2)
        extra = {"task_id": np.full(3, 2)}
    else:
        policy = tiny()
        attach_for_eval(policy, skill[1])
        controller, extra = load_bundle(skill[0]), {}
    worst = 0.0
    for t, obs in enumerate(_observations(REACH, 3, 14, seed=11)):
        if t == 6:  # one environment restarts mid-chunk
            policy.reset([1])
            controller.reset([1])
        expected = policy.select_action({**obs, **extra})
        got = controller.select_action(obs)
        worst = max(worst, float(np.abs(expected - got).max()))
    assert worst <= 1e-5
    policy.reset()
    controller.reset()
    for obs in _observations(REACH, 1, 6, seed=5):  # unbatched observations give (A,) actions
        one = {k: v[0] for k, v in obs.items()}
        got = controller.select_action(one)
        assert got.shape == (4,)
        assert np.abs(got - policy.select_action({**one, **{k: 2 for k in extra}})).max() <= 1e-5


def test_controller_drives_evaluate_like_the_torch_policy(skill):
    policy = tiny()
    attach_for_eval(policy, skill[1])
    torch_result = torch_evaluate.evaluate(policy, REACH, episodes=2, seed=EVAL_SEED)
    controller_result = torch_evaluate.evaluate(load_bundle(skill[0]), REACH, episodes=2, seed=EVAL_SEED)
    assert torch_result["episodes"] == controller_result["episodes"]


def test_fixed_rate_loop_keeps_time_and_counts_misses(skill):
    controller = load_bundle(skill[0])
    env = make(REACH, terminate_on_success=False)
    t0 = time.perf_counter()
    paced = run_episodes(env, controller, episodes=1, hz=200.0)
    elapsed = time.perf_counter() - t0
    assert elapsed >= 49 / 200, "a 200 Hz loop of 50 ticks cannot finish faster than its deadlines"
    assert paced["control/ticks"] == 50 and paced["control/policy_ms_p99"] >= paced["control/policy_ms_p50"] > 0
    rushed = run_episodes(env, controller, episodes=1, hz=1e6)
    assert rushed["control/deadline_misses"] >= 45, "1 us deadlines cannot be met"


def run_without_torch(body: str) -> dict:
    """Run ``body`` (which sets ``result``, a control metrics dict) in a fresh interpreter where importing torch
    fails, and return ``result`` without its per-episode list."""
    code = textwrap.dedent("""
        import importlib.abc, json, sys
        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is not installed on this controller")
        sys.meta_path.insert(0, NoTorch())
    """) + textwrap.dedent(body) + '\nprint(json.dumps({k: v for k, v in result.items() if k != "episodes"}))\n'
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_runs_in_a_process_where_torch_cannot_be_imported(skill):
    result = run_without_torch(f"""
        from robolora.controller import control_main
        result = control_main({str(skill[0])!r}, "{REACH}", hz=0, episodes=2, seed=0)
        assert "torch" not in sys.modules
    """)
    assert result["control/episodes"] == 2 and result["control/faults"] == 0
    assert result["control/ticks"] >= 2 and result["skill"] == "wipe"


@pytest.mark.slow
@pytest.mark.parametrize("skill_name, env_id", [(None, REACH), ("dish_rack", "robolora/DishRack-v0")])
def test_shipped_policy_succeeds_as_often_through_the_controller(tmp_path, skill_name, env_id):
    """The shipped base (and skill) exported and run by the controller on the torch evaluation's seeds: its success
    rate lies inside the torch policy's 95% interval."""
    from pathlib import Path

    from robolora.controller import control_main
    from robolora.policies import load_policy

    shipped = Path(__file__).resolve().parents[1] / "policies" / "pretrained"
    adapter = None if skill_name is None else shipped / "skills" / skill_name
    if not (shipped / "base" / "model.safetensors").is_file() or (adapter is not None and not adapter.is_dir()):
        pytest.skip("no shipped checkpoint under policies/pretrained")
    policy = load_policy(shipped / "base")
    task_id = 0 if adapter is None else None
    if adapter is not None:
        attach_for_eval(policy, adapter)
    export_bundle(shipped / "base", adapter, tmp_path / "bundle")
    torch_result = torch_evaluate.evaluate(policy, env_id, episodes=20, task_id=task_id)
    result = control_main(tmp_path / "bundle", env_id, hz=0, episodes=20)
    assert torch_result["eval/ci_low"] <= result["control/success_rate"] <= torch_result["eval/ci_high"]
    assert result["control/faults"] == 0


# ------------------------------------------------------------------------------------------ multi-skill bundles
def two_skills(root):
    """Adapter folders of two tiny skills that execute differently: wipe (4-action chunks) and dish_rack
    (temporal ensembling)."""
    wipe, dish = trained_adapter(seed=1), trained_adapter(seed=2)
    dish.skill = "dish_rack"
    dish.metadata["execution"] = {"n_action_steps": 1, "temporal_ensemble": 0.1}
    return save_adapter(wipe, root / "wipe"), save_adapter(dish, root / "dish_rack")


@pytest.fixture(scope="module")
def kitchen(tmp_path_factory):
    """(multi-skill bundle of wipe then dish_rack, {skill: adapter folder}) on the tiny policy, Reach's spaces."""
    root = tmp_path_factory.mktemp("kitchen")
    adapters = two_skills(root)
    export_skills(tiny(), adapters, root / "bundle", env_id=REACH, sequence=["wipe", "dish_rack"])
    return root / "bundle", dict(zip(("wipe", "dish_rack"), adapters))


def test_multi_skill_bundle_holds_every_skill_with_its_execution_and_checksums(kitchen):
    bundle, _ = kitchen
    index = json.loads((bundle / "skills.json").read_text())
    assert index["skills"] == ["wipe", "dish_rack"] and index["sequence"] == ["wipe", "dish_rack"]
    assert index["transitions"] == {"wipe": ["dish_rack"], "dish_rack": []} and index["representation"] == "bank"
    files = {f"skills/{s}/{f}" for s in index["skills"]
             for f in ("policy.json", "policy.onnx", "policy.pt2", "model.safetensors")}
    assert set(index["files"]) == files and all(len(f["sha256"]) == 64 for f in index["files"].values())
    assert sorted(p.name for p in bundle.iterdir()) == ["skills", "skills.json"], "no temporary folder is left"
    controller = load_bundle(bundle)
    assert controller.skills == ("wipe", "dish_rack") and controller.active == "wipe"
    assert controller.skill_spec("wipe").n_action_steps == 4
    assert controller.skill_spec("dish_rack").temporal_ensemble == 0.1
    for skill in index["skills"]:
        meta = json.loads((bundle / "skills" / skill / "policy.json").read_text())
        assert meta["skill"] == skill and meta["parity"]["max_abs_diff"] <= 1e-4


def test_a_skill_sequence_acts_exactly_like_the_torch_skill_manager(kitchen):
    """Switches at the same ticks (wipe mid-chunk -> dish_rack -> wipe) give the torch SkillManager's actions."""
    from robolora.skills import SkillManager

    bundle, adapters = kitchen
    controller = load_bundle(bundle)
    manager = SkillManager(tiny(), mode="bank")
    for path in adapters.values():
        manager.load(path)
    worst = 0.0
    switches = {0: "wipe", 6: "dish_rack", 11: "wipe"}
    for t, obs in enumerate(_observations(REACH, 1, 16, seed=7)):
        if t in switches:
            controller.activate(switches[t])
            manager.activate(switches[t])
        worst = max(worst, float(np.abs(controller.select_action(obs) - manager.select_action(obs)).max()))
    assert worst <= 1e-5


def test_activate_takes_effect_at_the_next_tick_and_drops_the_queue(kitchen):
    bundle, _ = kitchen
    controller = load_bundle(bundle)
    obs = make(REACH).reset(seed=0)[0]
    first = controller.select_action(obs)  # wipe queries a 4-action chunk and executes its first action
    calls = []
    controller.predict_chunk = lambda inputs: calls.append(controller.active) or controller.predict(inputs, [
        "actions"])[0]
    controller.activate("dish_rack")
    assert controller.active == "wipe" and not controller.switched, "nothing changes before the next tick"
    controller.select_action(obs)
    assert controller.active == "dish_rack" and controller.switched and calls == ["dish_rack"]
    assert len(controller.switch_s) == 1 and 0 < controller.switch_s[0] < 1e-3
    controller.activate("wipe")
    assert np.array_equal(controller.select_action(obs), first), "wipe restarts from a fresh chunk"
    assert calls == ["dish_rack", "wipe"]
    controller.activate("wipe")  # already active: no switch, the queue goes on
    controller.select_action(obs)
    assert calls == ["dish_rack", "wipe"] and not controller.switched


def test_activate_from_another_thread_never_mixes_skills(kitchen):
    """A thread flips skills as fast as it can while the loop steps one fixed observation: every tick runs one
    skill, from a fresh queue right after each switch (so its action is fixed by the skill and the ticks since)."""
    bundle, _ = kitchen
    controller = load_bundle(bundle)
    obs = make(REACH).reset(seed=0)[0]
    expected = {}
    for skill in ("wipe", "dish_rack"):  # each skill's first 200 actions on this observation from a fresh queue
        controller.activate(skill)
        controller.reset()
        expected[skill] = [controller.select_action(obs) for _ in range(200)]
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            for skill in ("wipe", "dish_rack"):
                controller.activate(skill)
                time.sleep(1e-4)

    thread = threading.Thread(target=flip)
    controller.reset()
    thread.start()
    try:
        log = []
        for _ in range(200):
            action = controller.select_action(obs)
            log.append((controller.active, controller.switched, action))
    finally:
        stop.set()
        thread.join()
    since, switches = 0, 0
    for skill, switched, action in log:
        since = 0 if switched else since + 1
        switches += switched
        assert np.array_equal(action, expected[skill][since]), (skill, since)
    assert switches >= 5, "the other thread's requests must land"


def test_unknown_skill_is_refused_naming_the_skills(kitchen):
    controller = load_bundle(kitchen[0])
    with pytest.raises(ValueError, match=r"unknown skill 'pour'.*\['wipe', 'dish_rack'\]"):
        controller.activate("pour")
    assert controller.active == "wipe"


@pytest.mark.parametrize("name", ["skills/dish_rack/policy.onnx", "skills/wipe/policy.json",
                                  "skills/wipe/model.safetensors"])
def test_a_tampered_skill_file_is_refused_by_checksum(kitchen, tmp_path, name):
    bundle = _copy(kitchen[0], tmp_path)
    data = bytearray((bundle / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{name} does not match its checksum in skills.json"):
        load_bundle(bundle)


def test_multi_skill_export_refuses_bad_input_and_writes_nothing(kitchen, tmp_path):
    adapters = kitchen[1]
    with pytest.raises(ValueError, match=r"sequence \['wipe', 'pour'\].*\['wipe', 'dish_rack'\]"):
        export_skills(tiny(), list(adapters.values()), tmp_path / "out", sequence=["wipe", "pour"])
    with pytest.raises(ValueError, match="distinct"):
        export_skills(tiny(), [adapters["wipe"], adapters["wipe"]], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    index = kitchen[0] / "skills.json"
    bundle = _copy(kitchen[0], tmp_path)
    meta = json.loads(index.read_text())
    meta["files"].pop("skills/dish_rack/policy.pt2")
    (bundle / "skills.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="records no sha256 for skills/dish_rack/policy.pt2"):
        load_bundle(bundle)


def test_multi_skill_bundle_runs_in_a_process_where_torch_cannot_be_imported(kitchen):
    result = run_without_torch(f"""
        from robolora.controller import control_main
        result = control_main({str(kitchen[0])!r}, "{REACH}", hz=0, episodes=2, seed=0, switch="schedule",
                              schedule=[10])
        assert "torch" not in sys.modules and "robolora.sequencer" in sys.modules
    """)
    assert result["skills"] == ["wipe", "dish_rack"] and result["switch"] == "schedule"
    assert result["control/switches"] >= 1 and result["control/faults"] == 0


def test_apply_pending_switches_between_ticks_and_the_next_tick_reports_it(kitchen):
    """The loop's idle-time switch: the same actions as switching at the next tick's start, switched reported once."""
    bundle, _ = kitchen
    early, late = load_bundle(bundle), load_bundle(bundle)
    obs = make(REACH).reset(seed=0)[0]
    for c in (early, late):
        c.select_action(obs)
        c.activate("dish_rack")
    assert early.apply_pending() and early.active == "dish_rack" and not early.apply_pending()
    assert len(early.switch_s) == 1 and late.active == "wipe"
    for tick in range(3):
        assert np.array_equal(early.select_action(obs), late.select_action(obs))
        assert early.switched == late.switched == (tick == 0)
