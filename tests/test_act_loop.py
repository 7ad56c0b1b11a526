"""The second policy through the whole loop (docs/policy.md): an ACT-style base on nn.MultiheadAttention is
pretrained, a LoRA skill is trained on its attention q/k/v/out_proj and feed-forward layers with `train-skill`,
evaluated, driven by the SkillManager in every mode, exported with parity and run by the torch-free controller.
Tiny settings: this tests the plumbing, not the success rate (docs/results.md has the measured one)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from robolora.cli import main
from robolora.controller import load_bundle
from robolora.data import collect
from robolora.envs import make
from robolora.export import PARITY_TOLERANCE
from robolora.inject import merge_adapter
from robolora.adapters import attach, load_adapter
from robolora.policies import ACTPolicy, load_policy
from robolora.policy import probe_batch
from robolora.skills import MODES, SkillManager

TARGETS = "self_attn.q,self_attn.k,self_attn.v,self_attn.out_proj,cross_attn.q,cross_attn.k,cross_attn.v," \
          "cross_attn.out_proj,linear1,linear2"


def cli(capsys, *args: str) -> dict:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base folder, adapter folder) of a tiny ACT base (2 reach demos) and a button_press skill (2 demos)."""
    root = tmp_path_factory.mktemp("act")
    collect("reach", 2, root / "reach", seed=0)
    collect("button_press", 2, root / "button_press", seed=0)
    assert main(["pretrain", "--policy", "act", "--preset", "tiny", "--data", str(root / "reach"), "--out",
                 str(root / "base"), "--steps", "6", "--batch-size", "8", "--json"]) == 0
    assert main(["train-skill", "--base", str(root / "base"), "--data", str(root / "button_press"), "--out",
                 str(root / "skill"), "--rank", "2", "--lr", "1e-2", "--targets", TARGETS, "--steps", "12",
                 "--batch-size", "8", "--json"]) == 0
    return root / "base" / "policy", root / "skill" / "adapter", root


def test_train_skill_adapts_attention_projections_of_the_act_base(trained):
    base, adapter_dir, _ = trained
    policy = load_policy(base)
    assert isinstance(policy, ACTPolicy)
    adapter = load_adapter(adapter_dir)
    assert "encoder.layers.0.self_attn.q" in adapter.lora and "decoder.layers.0.cross_attn.out_proj" in adapter.lora
    assert adapter.skill_token is not None and adapter.metadata["trainable_percent_of_base"] < 10
    b = adapter.lora["encoder.layers.0.self_attn.v"][1]
    assert b.abs().max() > 0, "training moved the attention LoRA B away from zero"


@pytest.mark.parametrize("mode", MODES)
def test_skill_manager_drives_the_act_skill_in_every_mode(trained, mode):
    base, adapter_dir, _ = trained
    adapter = load_adapter(adapter_dir)
    reference = load_policy(base).eval()
    attach(reference, adapter)
    merge_adapter(reference, adapter.skill)
    reference.set_skill_token(torch.nn.Parameter(adapter.skill_token.clone(), requires_grad=False))
    batch = probe_batch(reference, 3, seed=4)
    with torch.no_grad():
        expected = reference.predict_chunk(batch)
    policy = load_policy(base).eval().requires_grad_(False)  # frozen: nn.MultiheadAttention's path depends on it
    weights = {k: v.clone() for k, v in policy.state_dict().items()}
    with torch.no_grad():
        plain = policy.predict_chunk(batch)
    mgr = SkillManager(policy, mode)
    assert mgr.load(adapter_dir).live
    for name in random.Random(0).choices([None, adapter.skill], k=40):
        mgr.activate(name)
        out = mgr.predict_chunk(batch)
        assert (out - (plain if name is None else expected)).abs().max().item() <= (0.0 if name is None else 1e-5)
    mgr.close()
    assert all(torch.equal(v, weights[k]) for k, v in policy.state_dict().items())


def test_eval_export_and_the_torch_free_controller_run_the_act_skill(trained, capsys):
    base, adapter_dir, root = trained
    evaluated = cli(capsys, "eval", "--policy", str(base), "--skill", str(adapter_dir), "--task", "button_press",
                    "--episodes", "1")
    assert evaluated["results"][0]["episodes"] == 1
    exported = cli(capsys, "export", "--base", str(base), "--skill", str(adapter_dir), "--out",
                   str(root / "bundle"))
    assert exported["parity"]["max_abs_diff"] <= PARITY_TOLERANCE and exported["policy_kind"] == "act"
    controlled = cli(capsys, "control", "--bundle", str(root / "bundle"), "--env", "button_press", "--hz", "0",
                     "--episodes", "1")
    assert controlled["control/episodes"] == 1 and controlled["control/faults"] == 0
    # the controller acts as the torch SkillManager does, step by step
    controller = load_bundle(root / "bundle")
    mgr = SkillManager(load_policy(base).eval(), "bank")
    mgr.load(adapter_dir)
    mgr.activate(load_adapter(adapter_dir).skill)
    env = make("button_press")
    obs, _ = env.reset(seed=3)
    controller.reset()
    mgr.reset()
    for _ in range(6):
        action = mgr.select_action(obs)
        assert np.abs(controller.select_action(obs) - action).max() <= 2 * PARITY_TOLERANCE
        obs = env.step(action)[0]
    env.close()


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_act_base_is_bit_identical_after_100k_random_switches(trained, mode):
    base, adapter_dir, _ = trained
    policy = load_policy(base).eval().requires_grad_(False)
    weights = {k: v.clone() for k, v in policy.state_dict().items()}
    adapter = load_adapter(adapter_dir)
    mgr = SkillManager(policy, mode)
    for i in range(3):
        mgr.attach(f"s{i}", adapter)
    batch = probe_batch(policy, 1)
    rng = random.Random(mode)
    choices = [None, "s0", "s1", "s2", {"s0": 0.5, "s2": 0.5}]
    for i in range(100_000):
        choice = rng.choice(choices)
        mgr.blend(choice) if isinstance(choice, dict) else mgr.activate(choice)
        if i % 5_000 == 0:
            mgr.predict_chunk(batch)
        else:
            mgr.apply_pending()
    mgr.close()
    assert all(torch.equal(v, weights[k]) for k, v in policy.state_dict().items())
