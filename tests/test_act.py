"""Tests for policies/act.py: the ACT-style encoder-decoder policy on nn.MultiheadAttention, through the protocol."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from robolora.policies import (ACTConfig, ACTPolicy, PolicyConfig, VisuomotorPolicy, base_fingerprint, load_policy,
                               save_policy)
from robolora.policy import Execution, PolicySpec, check_policy

K, A, P, D = 8, 4, 10, 32  # chunk, action, proprio, tiny d_model


def tiny(**overrides) -> ACTConfig:
    return ACTConfig.preset("tiny", **overrides)


def make_batch(policy: ACTPolicy, batch_size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    batch = policy.spec.probe(batch_size, seed=seed)
    g = torch.Generator().manual_seed(seed)
    batch["action"] = torch.rand(batch_size, K, A, generator=g) * 2 - 1
    batch["action_is_pad"] = torch.zeros(batch_size, K, dtype=torch.bool)
    return batch


def make_obs(batch_size: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lead = () if batch_size is None else (batch_size,)
    return {"rgb_front": rng.integers(0, 256, (*lead, 64, 64, 3), dtype=np.uint8),
            "proprio": rng.standard_normal((*lead, P)).astype(np.float32)}


@pytest.fixture
def policy() -> ACTPolicy:
    torch.manual_seed(0)
    return ACTPolicy(tiny()).eval()


class CountingPredict:
    """Wraps predict_chunk to count queries and their batch sizes."""

    def __init__(self, policy: ACTPolicy) -> None:
        self.inner = policy.predict_chunk
        self.sizes: list[int] = []
        policy.predict_chunk = self  # instance attribute shadows the method

    def __call__(self, batch):
        self.sizes.append(batch["proprio"].shape[0])
        return self.inner(batch)


# ---- config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, low, high", [("tiny", 20e3, 100e3), ("base", 1.0e6, 2.0e6)])
def test_presets_are_sized_and_round_trip_json(name: str, low: float, high: float) -> None:
    config = ACTConfig.preset(name)
    assert (config.chunk_size, config.action_dim, config.cameras) == (K, A, ("front",))
    assert ACTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert low < sum(p.numel() for p in ACTPolicy(config).parameters()) < high


@pytest.mark.parametrize("overrides, fragment", [
    (dict(d_model=30, n_heads=4), "divisible by n_heads=4"),
    (dict(n_decoder_layers=0), "n_decoder_layers must be an int >= 1"),
    (dict(n_action_steps=9), "n_action_steps=9"),
    (dict(temporal_ensemble=0.1), "needs n_action_steps=1"),
    (dict(patch_grid=3), "power of two"),
    (dict(cameras=("side",)), "unknown camera"),
    (dict(dropout=1.0), "dropout must be in [0, 1)"),
])
def test_bad_config_names_field_value_and_range(overrides: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        tiny(**overrides)


def test_unknown_preset_and_unknown_field() -> None:
    with pytest.raises(ValueError, match=r"unknown ACT preset 'large'; available: \['base', 'tiny'\]"):
        ACTConfig.preset("large")
    with pytest.raises(ValueError, match="unknown ACTConfig field.*n_layers"):
        ACTConfig.from_dict({"n_layers": 2})


# ---- architecture ------------------------------------------------------------------------------------------


def test_attention_is_nn_multihead_attention_not_transformer_layers(policy: ACTPolicy) -> None:
    modules = dict(policy.named_modules())
    for name in ("encoder.layers.0.self_attn", "encoder.layers.1.self_attn", "decoder.layers.0.self_attn",
                 "decoder.layers.0.cross_attn"):
        assert isinstance(modules[name], nn.MultiheadAttention) and modules[name].batch_first
    for name in ("encoder.layers.0.linear1", "encoder.layers.0.linear2", "decoder.layers.0.linear1", "action_head"):
        assert type(modules[name]) is nn.Linear
    fused = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder, nn.TransformerDecoder)
    assert not any(isinstance(m, fused) for m in modules.values())


def test_eval_fast_path_matches_the_slow_path_and_train_mode(policy: ACTPolicy, monkeypatch) -> None:
    # In eval mode under no_grad, self-attention (query is key is value) runs torch._native_multi_head_attention;
    # with grad enabled (or in train mode) it runs F.multi_head_attention_forward. Measured max |diff| on CPU:
    # tiny 6e-7 and base 9.5e-7 over 10 random inits (batch 32), base 3.6e-7 after 1500 steps of training.
    fast_calls = []
    native = torch._native_multi_head_attention
    monkeypatch.setattr(torch, "_native_multi_head_attention", lambda *a, **k: fast_calls.append(1) or native(*a, **k))
    batch = make_batch(policy, batch_size=16)
    slow = policy.predict_chunk(batch)
    assert not fast_calls
    with torch.no_grad():
        fast = policy.predict_chunk(batch)
    assert len(fast_calls) == policy.config.n_encoder_layers + policy.config.n_decoder_layers
    assert (fast - slow).abs().max().item() <= 1e-6
    policy.requires_grad_(False)  # a frozen base in eval mode takes the fast path even with grad enabled
    assert torch.equal(policy.predict_chunk(batch), fast)
    policy.requires_grad_(True)
    policy.train()  # tiny has dropout 0: train mode computes what eval's slow path does
    assert torch.equal(policy.predict_chunk(batch), slow)


# ---- the protocol ------------------------------------------------------------------------------------------


def test_spec_is_a_valid_policy_spec_and_check_policy_passes(policy: ACTPolicy) -> None:
    spec = check_policy(policy, skill_token=True)
    assert isinstance(spec, PolicySpec)
    assert spec.input_keys == ("rgb_front", "proprio", "task_id") and spec.image_keys == ("rgb_front",)
    assert spec.observation["rgb_front"].shape == (64, 64, 3) and spec.observation["rgb_front"].dtype == "uint8"
    assert spec.observation["proprio"].mean == (0.0,) * P and spec.observation["proprio"].std == (1.0,) * P
    assert (spec.action.shape, spec.action.low, spec.action.high) == ((A,), -1.0, 1.0)
    assert (spec.chunk_size, spec.num_tasks, spec.skill_token_dim) == (K, 5, D)
    assert spec.execution == Execution(4, None)
    json.dumps(spec.to_dict())


def test_predict_chunk_is_clamped_and_the_loss_is_taken_before_the_clamp(policy: ACTPolicy) -> None:
    batch = make_batch(policy, batch_size=3)
    chunk = policy.predict_chunk(batch)
    assert chunk.shape == (3, K, A) and chunk.dtype == torch.float32 and chunk.abs().max() <= 1.0
    with torch.no_grad():
        policy.action_head.bias.fill_(5.0)
    assert torch.equal(policy.predict_chunk(batch), torch.ones(3, K, A))
    loss, metrics = policy(dict(batch, action=torch.ones(3, K, A)))
    assert loss.item() > 3.0 and set(metrics) == {"train/loss", "train/l1", "train/mse"}


def test_padded_steps_do_not_contribute_to_the_loss(policy: ACTPolicy) -> None:
    batch = make_batch(policy)
    batch["action_is_pad"][:, 5:] = True
    changed = dict(batch, action=batch["action"].clone())
    changed["action"][:, 5:] = 100.0
    assert policy(changed)[0].item() == policy(batch)[0].item()


def test_backprop_trains_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    policy = ACTPolicy(tiny()).train()
    batch = make_batch(policy, batch_size=8)
    # targets are a function of the state, as expert actions are
    batch["action"] = torch.tanh(batch["proprio"][:, None, :A]) * torch.linspace(1.0, 0.3, K).view(1, K, 1)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, _ = policy(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]


def test_batch_errors_say_what_is_missing(policy: ACTPolicy) -> None:
    batch = make_batch(policy)
    with pytest.raises(KeyError, match="task_id"):
        policy.predict_chunk({k: v for k, v in batch.items() if k != "task_id"})
    with pytest.raises(KeyError, match="action_is_pad"):
        policy({k: v for k, v in batch.items() if k != "action_is_pad"})
    with pytest.raises(ValueError, match="image_size=64"):
        policy.predict_chunk(dict(batch, rgb_front=batch["rgb_front"][:, :32, :32]))


def test_normalization_is_applied_and_validated(policy: ACTPolicy) -> None:
    batch = make_batch(policy)
    before = policy.predict_chunk(batch)
    policy.set_normalization({"proprio_mean": np.full(P, 3.0), "proprio_std": torch.full((P,), 2.0)})
    assert torch.allclose(policy.predict_chunk(dict(batch, proprio=batch["proprio"] * 2.0 + 3.0)), before, atol=1e-6)
    assert policy.spec.observation["proprio"].mean == (3.0,) * P
    with pytest.raises(ValueError, match="proprio_std must be > 0"):
        policy.set_normalization({"proprio_mean": np.zeros(P), "proprio_std": np.zeros(P)})
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        policy.set_normalization({"proprio_mean": np.zeros(3), "proprio_std": np.ones(3)})


def test_skill_token_replaces_the_task_embedding_for_every_sample(policy: ACTPolicy) -> None:
    batch = make_batch(policy)  # task ids 0, 1, 2, 3
    by_task = policy.predict_chunk(batch)
    assert not torch.equal(by_task[0], by_task[1])  # the task embedding matters
    same_obs = {k: v[:1].expand(4, *v.shape[1:]) for k, v in batch.items()}
    same_obs["task_id"] = torch.arange(4)
    n_params = len(list(policy.parameters()))
    token = nn.Parameter(torch.randn(D))
    policy.set_skill_token(token)
    assert any(p is token for p in policy.parameters()) and len(list(policy.parameters())) == n_params + 1
    assert torch.equal(policy.state_dict()["skill_token"], token.detach())
    with_token = policy.predict_chunk(same_obs)
    assert torch.equal(with_token, with_token[:1].expand_as(with_token))  # task ids are ignored
    assert not torch.allclose(with_token[0], by_task[0])  # and the token changed the output
    no_task = {k: v for k, v in same_obs.items() if k != "task_id"}
    assert torch.equal(policy.predict_chunk(no_task), with_token)
    policy.requires_grad_(False)
    token.requires_grad_(True)
    policy(dict(no_task, action=batch["action"], action_is_pad=batch["action_is_pad"]))[0].backward()
    assert token.grad is not None and token.grad.abs().sum() > 0
    policy.set_skill_token(None)
    assert "skill_token" not in policy.state_dict() and len(list(policy.parameters())) == n_params
    policy.requires_grad_(True)  # frozen weights in eval mode take the MHA fast path, whose last bits differ
    assert torch.equal(policy.predict_chunk(batch), by_task)
    with pytest.raises(ValueError, match=r"\(32,\) = \(d_model,\)"):
        policy.set_skill_token(nn.Parameter(torch.zeros(31)))
    with pytest.raises(TypeError, match="nn.Parameter"):
        policy.set_skill_token(torch.zeros(D))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="but the policy is on cpu"):
        policy.set_skill_token(nn.Parameter(torch.zeros(D, device="meta")))


# ---- acting ------------------------------------------------------------------------------------------------


def test_select_action_single_requeries_every_n_action_steps(policy: ACTPolicy) -> None:
    calls = CountingPredict(policy)
    obs = make_obs()
    chunk = calls.inner(policy.spec.batch(obs)[0])[0].detach()
    actions = [policy.select_action(obs) for _ in range(9)]
    assert actions[0].shape == (A,) and actions[0].dtype == np.float32
    assert len(calls.sizes) == 3  # steps 0, 4, 8
    np.testing.assert_allclose(np.stack(actions[:4]), chunk[:4].numpy(), atol=1e-6)


def test_temporal_ensembling_through_set_execution(policy: ACTPolicy) -> None:
    m = 0.5
    policy.set_execution(n_action_steps=1, temporal_ensemble=m)
    assert policy.config.temporal_ensemble == m and policy.spec.execution == Execution(1, m)
    chunks = iter([torch.full((1, K, A), float(i)) + torch.arange(K).view(1, K, 1) * 0.01 for i in range(3)])
    policy.predict_chunk = lambda batch: next(chunks)
    out = [policy.select_action(make_obs())[0] for _ in range(3)]
    w = np.exp(-m * np.arange(3))
    assert out[0] == pytest.approx(0.0)
    assert out[1] == pytest.approx((w[0] * 0.01 + w[1] * 1.0) / w[:2].sum(), rel=1e-5)
    assert out[2] == pytest.approx((w[0] * 0.02 + w[1] * 1.01 + w[2] * 2.0) / w.sum(), rel=1e-5)
    with pytest.raises(ValueError, match="n_action_steps=1"):
        policy.set_execution(n_action_steps=4)  # ensembling still on: refused, config kept
    assert policy.config.n_action_steps == 1


# ---- checkpoints -------------------------------------------------------------------------------------------


def test_save_load_round_trip_is_bit_exact(policy: ACTPolicy, tmp_path: Path) -> None:
    policy.set_normalization({"proprio_mean": torch.arange(P, dtype=torch.float32), "proprio_std": torch.ones(P)})
    policy.set_execution(n_action_steps=2)
    policy.set_skill_token(nn.Parameter(torch.randn(D)))
    save_policy(policy, tmp_path / "ck", metadata={"tasks": ["reach"]})
    header = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert header["policy"] == "act" and header["config"]["n_action_steps"] == 2
    loaded = load_policy(tmp_path / "ck")
    assert type(loaded) is ACTPolicy and loaded.config == policy.config and not loaded.training
    batch = make_batch(policy)
    assert torch.equal(loaded.predict_chunk(batch), policy.predict_chunk(batch))
    assert torch.equal(loaded.skill_token, policy.skill_token)
    assert base_fingerprint(loaded) == base_fingerprint(policy) == header["base_fingerprint"]
    saved, again = policy.state_dict(), loaded.state_dict()
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)


def test_checkpoints_name_their_policy_kind_and_a_missing_kind_is_visuomotor(tmp_path: Path) -> None:
    save_policy(VisuomotorPolicy(PolicyConfig.preset("tiny")), tmp_path / "vm")
    config_file = tmp_path / "vm" / "config.json"
    header = json.loads(config_file.read_text())
    assert header.pop("policy") == "visuomotor"
    config_file.write_text(json.dumps(header))  # as checkpoints written before the key existed (the shipped base)
    assert type(load_policy(tmp_path / "vm")) is VisuomotorPolicy
    config_file.write_text(json.dumps({**header, "policy": "diffusion"}))
    with pytest.raises(ValueError, match=r"policy kind 'diffusion'.*\['act', 'visuomotor'\]"):
        load_policy(tmp_path / "vm")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_forward_backward_and_select_action() -> None:
    torch.manual_seed(0)
    policy = ACTPolicy(tiny()).cuda()
    batch = {k: v.cuda() for k, v in make_batch(policy).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = policy(batch)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in policy.parameters() if p.requires_grad)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        action = policy.eval().select_action(make_obs(batch_size=2))
    assert action.shape == (2, A) and action.dtype == np.float32 and np.isfinite(action).all()
