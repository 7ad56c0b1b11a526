"""Tests for robolora.policies: config validation, the transformer, action execution, checkpoints, fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from robolora.policies import (ACTConfig, ACTPolicy, PolicyConfig, VisuomotorPolicy, base_fingerprint, load_policy,
                               save_policy)

K, A, P = 8, 4, 10


def tiny(**overrides) -> PolicyConfig:
    return PolicyConfig.preset("tiny", **overrides)


def make_batch(config: PolicyConfig, batch_size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = config.image_size
    batch = {key: torch.randint(0, 256, (batch_size, s, s, 3), dtype=torch.uint8, generator=g)
             for key in config.image_keys}
    batch["proprio"] = torch.randn(batch_size, config.proprio_dim, generator=g)
    batch["task_id"] = torch.randint(0, config.num_tasks, (batch_size,), generator=g)
    batch["action"] = torch.rand(batch_size, config.chunk_size, config.action_dim, generator=g) * 2 - 1
    batch["action_is_pad"] = torch.zeros(batch_size, config.chunk_size, dtype=torch.bool)
    return batch


def make_obs(config: PolicyConfig, batch_size: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lead = () if batch_size is None else (batch_size,)
    s = config.image_size
    obs = {key: rng.integers(0, 256, (*lead, s, s, 3), dtype=np.uint8) for key in config.image_keys}
    obs["proprio"] = rng.standard_normal((*lead, config.proprio_dim)).astype(np.float32)
    return obs


@pytest.fixture
def policy() -> VisuomotorPolicy:
    torch.manual_seed(0)
    return VisuomotorPolicy(tiny()).eval()


# ---- config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "base", "large"])
def test_presets_are_valid_and_round_trip_json(name: str) -> None:
    config = PolicyConfig.preset(name)
    assert config.chunk_size == K and config.n_action_steps == 4 and config.cameras == ("front",)
    assert config.stem_channels[-1] == config.d_model
    again = PolicyConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


def test_base_preset_matches_training_md() -> None:
    config = PolicyConfig.preset("base")
    assert (config.d_model, config.n_layers, config.n_heads, config.num_image_tokens) == (128, 4, 4, 16)
    params = sum(p.numel() for p in VisuomotorPolicy(config).parameters())
    assert 0.9e6 < params < 1.2e6


@pytest.mark.parametrize("overrides, fragment", [
    (dict(d_model=30, n_heads=4), "divisible by n_heads"),
    (dict(n_action_steps=9), "n_action_steps=9"),
    (dict(n_action_steps=0), "n_action_steps must be an int >= 1"),
    (dict(temporal_ensemble=0.01), "needs n_action_steps=1"),
    (dict(temporal_ensemble=-1.0, n_action_steps=1), "temporal_ensemble must be"),
    (dict(patch_grid=3), "power of two"),
    (dict(image_size=64, patch_grid=64), "power of two"),
    (dict(cameras=("side",)), "unknown camera"),
    (dict(cameras="front"), "tuple of camera names"),
    (dict(dropout=1.0), "dropout must be in [0, 1)"),
    (dict(num_tasks=True), "num_tasks must be an int"),
])
def test_bad_config_names_field_value_and_range(overrides: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        tiny(**overrides)
    assert fragment in str(err.value)


def test_unknown_preset_and_unknown_field() -> None:
    with pytest.raises(ValueError, match="available"):
        PolicyConfig.preset("huge")
    with pytest.raises(ValueError, match="d_modle"):
        PolicyConfig.preset("tiny", d_modle=64)


# ---- the network -------------------------------------------------------------------------------------------


def test_forward_and_predict_shapes_and_layer_names() -> None:
    config = tiny(cameras=("front", "wrist"))
    model = VisuomotorPolicy(config)
    batch = make_batch(config, batch_size=3)
    loss, metrics = model(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(metrics) == {"train/loss", "train/l1", "train/mse"} and all(type(v) is float for v in metrics.values())
    chunk = model.predict_chunk(batch)
    assert chunk.shape == (3, K, A) and chunk.abs().max() <= 1.0
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for part in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc1", "mlp.fc2"):
        assert f"blocks.1.{part}" in names


def test_overfits_a_fixed_batch() -> None:
    torch.manual_seed(0)
    config = tiny()
    model = VisuomotorPolicy(config).train()
    batch = make_batch(config, batch_size=8)
    # targets are a function of the state, as expert actions are (random targets take ~150 steps to memorise)
    batch["action"] = torch.tanh(batch["proprio"][:, None, :A]) * torch.linspace(1.0, 0.3, K).view(1, K, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.4 * losses[0]


def test_padded_steps_do_not_contribute_to_the_loss(policy: VisuomotorPolicy) -> None:
    batch = make_batch(policy.config)
    batch["action_is_pad"][:, 5:] = True
    loss, _ = policy(batch)
    changed = dict(batch, action=batch["action"].clone())
    changed["action"][:, 5:] = 100.0
    loss2, _ = policy(changed)
    assert loss2.item() == loss.item()
    pred = policy.predict_chunk(batch)  # a fresh head predicts near 0, so the clamp does nothing here
    expected = (pred - batch["action"])[:, :5].abs().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    changed["action"][:, 0] = 100.0  # a valid step does count
    assert policy(changed)[0].item() > loss.item() + 10


def test_batch_errors_say_what_is_missing(policy: VisuomotorPolicy) -> None:
    batch = make_batch(policy.config)
    del batch["rgb_front"]
    with pytest.raises(KeyError, match="rgb_front"):
        policy(batch)
    batch = make_batch(tiny(image_size=32))
    with pytest.raises(ValueError, match="image_size=64"):
        policy(batch)


def test_normalization_is_applied_and_validated(policy: VisuomotorPolicy) -> None:
    batch = make_batch(policy.config)
    before = policy.predict_chunk(batch)
    mean, std = torch.full((P,), 3.0), torch.full((P,), 2.0)
    policy.set_normalization({"proprio_mean": mean, "proprio_std": std})
    shifted = dict(batch, proprio=batch["proprio"] * 2.0 + 3.0)
    assert torch.allclose(policy.predict_chunk(shifted), before, atol=1e-6)
    assert "proprio_mean" in policy.state_dict()
    with pytest.raises(ValueError, match="proprio_std must be > 0"):
        policy.set_normalization({"proprio_mean": mean, "proprio_std": torch.zeros(P)})
    with pytest.raises(ValueError, match="lack 'proprio_std'"):
        policy.set_normalization({"proprio_mean": mean})


def test_skill_token_replaces_task_embedding_and_trains(policy: VisuomotorPolicy) -> None:
    batch = make_batch(policy.config)
    n_params = len(list(policy.parameters()))
    token = nn.Parameter(policy.task_embed.weight[2].detach().clone())
    policy.set_skill_token(token)
    assert any(p is token for p in policy.parameters()) and len(list(policy.parameters())) == n_params + 1
    as_task2 = policy.predict_chunk(dict(batch, task_id=torch.full((4,), 2)))
    policy.set_skill_token(None)
    assert torch.equal(policy.predict_chunk(dict(batch, task_id=torch.full((4,), 2))), as_task2)
    policy.set_skill_token(token)
    no_task = {k: v for k, v in batch.items() if k != "task_id"}
    assert torch.equal(policy.predict_chunk(no_task), as_task2)  # task ids are ignored while a token is set
    policy.task_embed.weight.requires_grad_(False)
    loss, _ = policy(no_task)
    loss.backward()
    assert token.grad is not None and token.grad.abs().sum() > 0
    policy.set_skill_token(None)
    assert "skill_token" not in policy.state_dict() and len(list(policy.parameters())) == n_params
    with pytest.raises(ValueError, match=r"\(32,\)"):
        policy.set_skill_token(nn.Parameter(torch.zeros(31)))
    with pytest.raises(TypeError, match="nn.Parameter"):
        policy.set_skill_token(torch.zeros(32))


# ---- acting ------------------------------------------------------------------------------------------------


class CountingPredict:
    """Wraps predict_chunk to count queries and their batch sizes."""

    def __init__(self, policy: VisuomotorPolicy) -> None:
        self.inner = policy.predict_chunk
        self.sizes: list[int] = []
        policy.predict_chunk = self  # instance attribute shadows the method

    def __call__(self, batch):
        self.sizes.append(batch["proprio"].shape[0])
        return self.inner(batch)


def test_select_action_unbatched_requeries_every_n_action_steps(policy: VisuomotorPolicy) -> None:
    calls = CountingPredict(policy)
    obs = make_obs(policy.config)
    chunk = calls.inner({k: torch.as_tensor(v)[None] for k, v in obs.items()} | {"task_id": torch.zeros(1)})[0].detach()
    actions = [policy.select_action(obs) for _ in range(9)]
    assert actions[0].shape == (A,) and actions[0].dtype == np.float32
    assert len(calls.sizes) == 3  # steps 0, 4, 8
    np.testing.assert_allclose(np.stack(actions[:4]), chunk[:4].numpy(), atol=1e-6)
    np.testing.assert_allclose(actions[4], chunk[0].numpy(), atol=1e-6)  # same obs: a new chunk restarts
    policy.reset()
    policy.select_action(obs)
    assert len(calls.sizes) == 4


def test_set_execution_changes_requery_period_not_weights(policy: VisuomotorPolicy) -> None:
    fingerprint = base_fingerprint(policy)
    calls = CountingPredict(policy)
    obs = make_obs(policy.config)
    policy.set_execution(n_action_steps=2)
    for _ in range(6):
        policy.select_action(obs)
    assert len(calls.sizes) == 3  # steps 0, 2, 4
    policy.set_execution(n_action_steps=1, temporal_ensemble=0.1)
    for _ in range(3):
        policy.select_action(obs)
    assert len(calls.sizes) == 6 and policy.config.temporal_ensemble == 0.1
    with pytest.raises(ValueError, match="n_action_steps=1"):
        policy.set_execution(n_action_steps=4)  # ensembling still on: refused, config kept
    assert policy.config.n_action_steps == 1
    policy.set_execution(n_action_steps=4, temporal_ensemble=None)
    assert policy.config.temporal_ensemble is None and base_fingerprint(policy) == fingerprint


@pytest.mark.parametrize("policy_cls", ["visuomotor", "act"])
def test_select_action_batched_and_per_element_reset(policy_cls: str) -> None:
    # the acting mixin (robolora.policy.ChunkedActing) both policies share
    torch.manual_seed(0)
    policy = (VisuomotorPolicy(tiny()) if policy_cls == "visuomotor" else ACTPolicy(ACTConfig.preset("tiny"))).eval()
    calls = CountingPredict(policy)
    obs = make_obs(policy.config, batch_size=3)
    obs["task_id"] = np.array([0, 1, 4])
    single = []
    for i in range(3):
        policy.reset()
        single.append(policy.select_action({k: v[i] for k, v in obs.items()}))
    policy.reset()
    calls.sizes.clear()
    first = policy.select_action(obs)
    assert first.shape == (3, A)
    np.testing.assert_allclose(first, np.stack(single), atol=1e-5)
    policy.select_action(obs)
    policy.reset([1])  # env 1 finished its episode: only it re-queries next step
    policy.select_action(obs)
    assert calls.sizes == [3, 1]
    policy.select_action(obs)
    policy.select_action(obs)  # step 4 for envs 0 and 2
    assert calls.sizes == [3, 1, 2]
    with pytest.raises(ValueError, match="reset"):
        policy.select_action(make_obs(policy.config, batch_size=2))


def test_temporal_ensemble_weights_older_predictions_more() -> None:
    m = 0.5
    policy = VisuomotorPolicy(tiny(temporal_ensemble=m, n_action_steps=1)).eval()
    chunks = [torch.full((1, K, A), float(i)) + torch.arange(K).view(1, K, 1) * 0.01 for i in range(3)]
    it = iter(chunks)
    policy.predict_chunk = lambda batch: next(it)
    obs = make_obs(policy.config)
    out = [policy.select_action(obs)[0] for _ in range(3)]
    w = np.exp(-m * np.arange(3))
    assert out[0] == pytest.approx(0.0)
    assert out[1] == pytest.approx((w[0] * 0.01 + w[1] * 1.0) / w[:2].sum(), rel=1e-5)
    assert out[2] == pytest.approx((w[0] * 0.02 + w[1] * 1.01 + w[2] * 2.0) / w.sum(), rel=1e-5)
    policy.reset()
    policy.predict_chunk = lambda batch: torch.full((1, K, A), 7.0)
    assert policy.select_action(obs)[0] == pytest.approx(7.0)


# ---- checkpoints and fingerprint ---------------------------------------------------------------------------


def test_save_load_round_trip_is_bit_exact(policy: VisuomotorPolicy, tmp_path: Path) -> None:
    policy.set_normalization({"proprio_mean": torch.arange(P, dtype=torch.float32), "proprio_std": torch.ones(P)})
    policy.set_skill_token(nn.Parameter(torch.randn(32)))
    save_policy(policy, tmp_path / "ck", metadata={"tasks": ["reach"]})
    header = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert header["metadata"] == {"tasks": ["reach"]} and header["base_fingerprint"] == base_fingerprint(policy)
    loaded = load_policy(tmp_path / "ck")
    batch = make_batch(policy.config)
    assert torch.equal(loaded.predict_chunk(batch), policy.predict_chunk(batch))
    assert torch.equal(loaded.skill_token, policy.skill_token)
    assert base_fingerprint(loaded) == base_fingerprint(policy)
    save_policy(policy, tmp_path / "ck")  # replacing an existing checkpoint works and leaves no temp folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def _tamper(path: Path, edit) -> None:
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"))


@pytest.mark.parametrize("edit, fragment", [
    (lambda s: s.pop("blocks.0.attn.q.weight"), "lacks tensor(s) ['blocks.0.attn.q.weight']"),
    (lambda s: s.update({"blocks.0.attn.q.lora_A.weight": torch.zeros(2, 32)}), "unexpected tensor(s)"),
    (lambda s: s.update({"action_head.weight": torch.zeros(5, 32)}), "'action_head.weight' has shape (5, 32)"),
    (lambda s: s.update({"action_head.bias": torch.zeros(4, dtype=torch.float64)}), "torch.float64"),
    (lambda s: s["action_head.bias"].add_(1.0), "base_fingerprint"),
])
def test_load_rejects_bad_tensors_by_name(policy: VisuomotorPolicy, tmp_path: Path, edit, fragment: str) -> None:
    save_policy(policy, tmp_path / "ck")
    _tamper(tmp_path / "ck", edit)
    with pytest.raises(ValueError) as err:
        load_policy(tmp_path / "ck")
    assert fragment in str(err.value)


def test_load_errors_for_missing_paths(policy: VisuomotorPolicy, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no policy checkpoint folder"):
        load_policy(tmp_path / "nope")
    save_policy(policy, tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_policy(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_policy(tmp_path / "ck")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to replace"):
        save_policy(policy, tmp_path / "other")


class _Wrapped(nn.Module):
    """A stand-in for a LoRA wrapper: base layer under ``base_layer`` plus ``lora_*`` parameters."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Parameter(torch.randn(2, base.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)


def test_fingerprint_ignores_lora_wrappers_and_skill_token_but_not_weights(policy: VisuomotorPolicy) -> None:
    ref = base_fingerprint(policy)
    assert len(ref) == 64
    policy.set_skill_token(nn.Parameter(torch.randn(32)))
    policy.blocks[0].attn.q = _Wrapped(policy.blocks[0].attn.q)
    assert "blocks.0.attn.q.base_layer.weight" in policy.state_dict()
    assert base_fingerprint(policy) == ref
    with pytest.raises(ValueError, match="LoRA-wrapped"):
        save_policy(policy, "/nonexistent/never-written")
    with torch.no_grad():
        policy.blocks[0].attn.q.base_layer.weight[0, 0] += 1e-3
    assert base_fingerprint(policy) != ref


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_forward_backward_and_select_action() -> None:
    torch.manual_seed(0)
    policy = VisuomotorPolicy(tiny()).cuda()
    batch = {k: v.cuda() for k, v in make_batch(policy.config).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, metrics = policy(batch)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in policy.parameters() if p.requires_grad)
    assert loss.dtype == torch.float32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        action = policy.eval().select_action(make_obs(policy.config, batch_size=2))
    assert action.shape == (2, A) and action.dtype == np.float32 and np.isfinite(action).all()


@pytest.mark.parametrize("text", ["null", "[]", "7"])
def test_load_refuses_a_config_json_that_is_not_an_object(policy: VisuomotorPolicy, tmp_path: Path,
                                                          text: str) -> None:
    save_policy(policy, tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text(text)
    with pytest.raises(ValueError, match="config.json must hold a JSON object"):
        load_policy(tmp_path / "ck")


def test_load_policy_finds_the_shipped_base_by_name_from_any_folder(policy: VisuomotorPolicy, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from robolora.recipes import shipped_base

    if not (shipped_base() / "config.json").exists():
        pytest.skip("no shipped base in this installation")
    monkeypatch.chdir(tmp_path)
    assert base_fingerprint(load_policy("base")) == base_fingerprint(load_policy(shipped_base()))
    with pytest.raises(FileNotFoundError, match=r"no policy checkpoint folder at .*shipped: \['base'\]"):
        load_policy("bsae")
    save_policy(policy, tmp_path / "base")  # an existing folder wins over the shipped name
    assert base_fingerprint(load_policy("base")) == base_fingerprint(policy)
