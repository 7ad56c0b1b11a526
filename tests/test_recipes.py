"""Recipes end to end on real demos with the tiny preset: pretrain, then a skill by LoRA / full FT / scratch."""

from __future__ import annotations

import json

import pytest
import torch

from robolora.adapters import load_adapter
from robolora.data import collect, load_manifest
from robolora.policies import base_fingerprint, load_policy
from robolora.recipes import balanced_weights, pretrain, train_skill
from robolora.train import TrainConfig

FAST = TrainConfig(steps=6, batch_size=8, warmup_steps=1, log_every=3, device="cpu")


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    root = tmp_path_factory.mktemp("demos")
    collect("robolora/Reach-v0", 2, root / "reach", seed=0)
    collect("robolora/ButtonPress-v0", 2, root / "button_press", seed=0)
    collect("robolora/DishRack-v0", 2, root / "dish_rack", seed=0)
    return root


@pytest.fixture(scope="module")
def base(demos, tmp_path_factory):
    run = tmp_path_factory.mktemp("base")
    pretrain([demos / "reach", demos / "button_press"], run, preset="tiny", config=FAST)
    return run / "policy"


def test_pretrain_saves_a_loadable_base_with_its_tasks(base):
    policy = load_policy(base)
    meta = json.loads((base / "config.json").read_text())["metadata"]
    assert meta["tasks"] == {"reach": 0, "button_press": 4}
    assert policy.config.d_model == 32 and not policy.training
    assert torch.isfinite(policy.proprio_std).all() and (policy.proprio_std > 0).all()


def test_pretrain_refuses_skill_data(demos, tmp_path):
    with pytest.raises(ValueError, match="base tasks"):
        pretrain([demos / "dish_rack"], tmp_path, preset="tiny", config=FAST)


def test_pretrain_continues_from_a_saved_policy(base, demos, tmp_path):
    start = load_policy(base)
    still = TrainConfig(steps=1, batch_size=8, warmup_steps=0, lr=1e-12, weight_decay=0.0, device="cpu")
    pretrain([demos / "reach", demos / "button_press"], tmp_path, preset="tiny", config=still, init_from=base)
    continued = load_policy(tmp_path / "policy")
    for name, tensor in start.state_dict().items():
        if "norm_" in name or name.endswith(("_mean", "_std")):
            continue  # statistics are recomputed from the (same) data
        assert torch.allclose(continued.state_dict()[name], tensor, atol=1e-6), name
    with pytest.raises(ValueError, match="same config"):
        pretrain([demos / "reach"], tmp_path / "other", preset="base", config=still, init_from=base)


def test_task_weights_scale_each_task_share(demos):
    dirs = [demos / "reach", demos / "button_press"]
    plain = balanced_weights(dirs)
    n_reach = sum(e["length"] for e in load_manifest(demos / "reach")["episodes"])
    assert plain[:n_reach].sum().item() == pytest.approx(1.0) and plain[n_reach:].sum().item() == pytest.approx(1.0)
    weighted = balanced_weights(dirs, {"button_press": 3.0})
    assert weighted[:n_reach].sum().item() == pytest.approx(1.0)
    assert weighted[n_reach:].sum().item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="no data folder holds"):
        balanced_weights(dirs, {"push": 2.0})
    with pytest.raises(ValueError, match="> 0"):
        balanced_weights(dirs, {"reach": 0.0})


def test_lora_skill_trains_only_the_adapter_and_keeps_the_base(base, demos, tmp_path):
    fingerprint = base_fingerprint(load_policy(base))
    info = train_skill(base, demos / "dish_rack", tmp_path, method="lora", config=FAST)
    assert info["skill"] == "dish_rack" and info["demos"] == 2
    assert 0 < info["trainable_percent_of_base"] < 100
    adapter = load_adapter(tmp_path / "adapter")
    assert adapter.base_fingerprint == fingerprint and adapter.skill_token is not None
    assert any(b.abs().sum() > 0 for _, b in adapter.lora.values()), "training must move B off zero"
    assert base_fingerprint(load_policy(base)) == fingerprint, "the base checkpoint is never written"
    assert adapter.metadata["train_metrics"]["train/loss"] > 0


def test_demo_budget_limits_episodes(base, demos, tmp_path):
    info = train_skill(base, demos / "dish_rack", tmp_path, method="lora", config=FAST, demos=1)
    assert info["demos"] == 1
    with pytest.raises(ValueError, match="collect more"):
        train_skill(base, demos / "dish_rack", tmp_path / "x", config=FAST, demos=5)


@pytest.mark.parametrize("method", ["full", "scratch"])
def test_baselines_save_whole_policies_with_a_skill_token(base, demos, tmp_path, method):
    info = train_skill(base, demos / "dish_rack", tmp_path, method=method, config=FAST)
    policy = load_policy(tmp_path / "policy")
    assert policy.skill_token is not None
    assert info["trainable_percent_of_base"] > 99
    changed = base_fingerprint(policy) != base_fingerprint(load_policy(base))
    assert changed, f"{method} must change the base weights"


def test_selection_keeps_the_best_validation_step(base, demos, tmp_path, monkeypatch):
    import dataclasses

    import robolora.evaluate
    from robolora.stats import VALIDATION_SEED

    rates, tokens, seeds = iter([0.2, 0.6, 0.4]), {}, []

    def scripted_evaluate(policy, env_id, episodes, *, seed, **kwargs):  # the rollouts' outcome, scripted
        seeds.append(seed)
        tokens[len(seeds)] = policy.skill_token.detach().clone()
        return {"eval/success_rate": next(rates)}

    monkeypatch.setattr(robolora.evaluate, "evaluate", scripted_evaluate)
    config = dataclasses.replace(FAST, eval_every=2)
    info = train_skill(base, demos / "dish_rack", tmp_path, method="lora", config=config, select_episodes=3)
    assert info["selection"] == {"step": 4, "success_rate": 0.6, "episodes": 3, "seed": VALIDATION_SEED}
    assert seeds == [VALIDATION_SEED] * 3
    saved = load_adapter(tmp_path / "adapter")
    assert torch.equal(saved.skill_token, tokens[2]), "the adapter holds step 4's weights"
    assert not torch.equal(saved.skill_token, tokens[3]), "not the last step's"
    assert saved.metadata["selection"]["step"] == 4
    from robolora.recipes import KeepBest

    resumed = KeepBest(load_policy(base), "robolora/DishRack-v0", tmp_path, 3)  # a resumed run knows its best
    assert resumed.best == {"step": 4, "success_rate": 0.6}
