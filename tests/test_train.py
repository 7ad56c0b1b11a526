"""The BC loop: loss falls, a run killed at any moment (checkpointing included) resumes exactly, only trainable
parameters move, schedules and sampling."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from robolora.policies import PolicyConfig, VisuomotorPolicy
from robolora.train import BatchSampler, TrainConfig, lr_at, random_shift, train


class SyntheticDemos(Dataset):
    """A few fixed (observation, action chunk) pairs whose action depends on the image and the task."""

    def __init__(self, n: int = 16, k: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 64, 64, 3), generator=g, dtype=torch.uint8)
        self.proprio = torch.randn(n, 10, generator=g)
        self.task_id = torch.randint(0, 5, (n,), generator=g)
        base = self.images.float().mean(dim=(1, 2)) / 128 - 1  # (n, 3)
        self.action = torch.cat([base, self.task_id[:, None].float() / 4 - 0.5], 1)[:, None].repeat(1, k, 1)
        self.k = k

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"rgb_front": self.images[i], "proprio": self.proprio[i], "task_id": self.task_id[i],
                "action": self.action[i], "action_is_pad": torch.zeros(self.k, dtype=torch.bool)}


def tiny_policy(seed: int = 0) -> VisuomotorPolicy:
    torch.manual_seed(seed)
    return VisuomotorPolicy(PolicyConfig.preset("tiny"))


def test_tiny_policy_loss_falls(tmp_path):
    policy, data = tiny_policy(), SyntheticDemos()
    config = TrainConfig(steps=60, batch_size=16, lr=3e-3, warmup_steps=5, log_every=5, device="cpu")
    train(policy, data, config, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(5, 61, 5))
    assert lines[-1]["train/loss"] < 0.5 * lines[0]["train/loss"]
    assert checkpoint_step(tmp_path) == 60 and not (tmp_path / "train_state.json").exists()


class Killed(Exception):
    pass


RESUMABLE = TrainConfig(steps=24, batch_size=8, lr=1e-3, warmup_steps=2, log_every=4, checkpoint_every=8,
                        device="cpu")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights after an uninterrupted RESUMABLE run, which every resumed run must reproduce bit for bit."""
    reference = tiny_policy()
    train(reference, SyntheticDemos(), RESUMABLE, tmp_path_factory.mktemp("uninterrupted"))
    return reference.state_dict()


def resume_to_the_end(run: Path) -> dict[str, torch.Tensor]:
    resumed = tiny_policy(seed=123)  # a fresh process: different init, all state must come from the checkpoint
    train(resumed, SyntheticDemos(), RESUMABLE, run, resume=True)
    return resumed.state_dict()


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name


def checkpoint_step(run: Path) -> int:
    with safe_open(str(run / "train_state.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["robolora/train_state"])["step"]


def kill_at(step: int) -> Callable[[int, dict[str, float]], None]:
    def on_step(done: int, metrics: dict[str, float]) -> None:
        if done == step:
            raise Killed
    return on_step


def test_killed_run_resumes_to_the_same_weights(tmp_path, uninterrupted):
    with pytest.raises(Killed):
        train(tiny_policy(), SyntheticDemos(), RESUMABLE, tmp_path, on_step=kill_at(13))
    assert checkpoint_step(tmp_path) == 8
    assert_same_weights(resume_to_the_end(tmp_path), uninterrupted)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12, 16, 20, 24], "metrics after the checkpoint must not be duplicated on resume"


@pytest.mark.parametrize("moment", ["before", "after"])
def test_a_kill_while_checkpointing_resumes_to_the_same_weights(tmp_path, monkeypatch, uninterrupted, moment):
    """A kill just before or just after the step-16 save renames its first file resumes exactly (from step 8 or
    16). The old layout renamed its tensors, then its step JSON: a kill between the two resumed from step 8 with
    step 16's weights, optimizer and RNG."""
    real_replace, armed = os.replace, []

    def killed_replace(src: str | Path, dst: str | Path) -> None:
        if armed and moment == "before":
            raise Killed
        real_replace(src, dst)
        if armed:
            raise Killed

    monkeypatch.setattr(os, "replace", killed_replace)
    with pytest.raises(Killed):
        train(tiny_policy(), SyntheticDemos(), RESUMABLE, tmp_path,
              on_step=lambda step, _: armed.append(step) if step == 16 else None)
    monkeypatch.undo()
    assert checkpoint_step(tmp_path) == {"before": 8, "after": 16}[moment]
    assert not list(tmp_path.glob(".train_state*")), "a temporary checkpoint file was left behind"
    assert_same_weights(resume_to_the_end(tmp_path), uninterrupted)


def test_a_format_1_checkpoint_resumes_and_a_torn_one_is_refused(tmp_path, uninterrupted):
    """Format 1 kept the step in train_state.json beside header-less tensors; resuming one still works, and one
    whose JSON is older than its tensors (killed between the two writes) is refused."""
    with pytest.raises(Killed):
        train(tiny_policy(), SyntheticDemos(), RESUMABLE, tmp_path, on_step=kill_at(13))
    with safe_open(str(tmp_path / "train_state.safetensors"), framework="pt") as f:
        meta = {**json.loads(f.metadata()["robolora/train_state"]), "format": 1}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    save_file(tensors, str(tmp_path / "train_state.safetensors"))
    (tmp_path / "train_state.json").write_text(json.dumps({**meta, "step": 4}))
    with pytest.raises(ValueError, match="parts disagree"):
        resume_to_the_end(tmp_path)
    (tmp_path / "train_state.json").write_text(json.dumps(meta))
    assert_same_weights(resume_to_the_end(tmp_path), uninterrupted)
    assert checkpoint_step(tmp_path) == 24 and not (tmp_path / "train_state.json").exists()


def test_resume_refuses_a_different_model(tmp_path):
    config = TrainConfig(steps=4, batch_size=4, warmup_steps=1, device="cpu", checkpoint_every=2)
    train(tiny_policy(), SyntheticDemos(), config, tmp_path)
    other = VisuomotorPolicy(PolicyConfig.preset("tiny", n_layers=1))
    with pytest.raises(ValueError, match="trainable parameters differ"):
        train(other, SyntheticDemos(), config, tmp_path, resume=True)


def test_only_trainable_parameters_change(tmp_path):
    policy = tiny_policy()
    for name, p in policy.named_parameters():
        p.requires_grad_(name.startswith("action_head"))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    train(policy, SyntheticDemos(), TrainConfig(steps=5, batch_size=8, warmup_steps=1, device="cpu"), tmp_path)
    for name, value in policy.state_dict().items():
        assert torch.equal(value, before[name]) != name.startswith("action_head"), name


def test_nothing_trainable_is_an_error(tmp_path):
    policy = tiny_policy().requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        train(policy, SyntheticDemos(), TrainConfig(steps=2, warmup_steps=0, device="cpu"), tmp_path)


def test_schedule_warms_up_then_decays_to_the_floor():
    config = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, config) == pytest.approx(1e-4)
    assert lr_at(9, config) == pytest.approx(1e-3)
    assert lr_at(99, config) == pytest.approx(1e-4, rel=1e-2)
    assert all(lr_at(s, config) >= lr_at(s + 1, config) for s in range(10, 99))


def test_sampler_is_stateless_and_balances_weights():
    weights = torch.cat([torch.full((90,), 1 / 90), torch.full((10,), 1 / 10)])
    sampler = BatchSampler(100, 512, seed=3, weights=weights)
    assert sampler.indices(7) == BatchSampler(100, 512, seed=3, weights=weights).indices(7)
    assert sampler.indices(7) != sampler.indices(8)
    small = sum(i >= 90 for i in sampler.indices(0)) / 512
    assert 0.4 < small < 0.6, "a 10-sample task must get about half of the batch"
    with pytest.raises(ValueError, match="empty"):
        BatchSampler(0, 4, seed=0)


def test_random_shift_moves_content_by_its_offset_and_keeps_shape():
    images = torch.zeros(3, 16, 16, 3, dtype=torch.uint8)
    images[:, 8, 8] = 255
    offsets = torch.tensor([[2, 2], [0, 0], [4, 1]])  # (dx, dy) in [0, 2 * pad]; (pad, pad) is no shift
    out = random_shift(images, 2, offsets)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out[0], images[0])
    assert out[1, 10, 10].eq(255).all() and out[2, 9, 6].eq(255).all()
    assert int((out == 255).sum()) == 3 * 3


def test_shift_offsets_stay_in_range_and_differ_per_view():
    first, second = BatchSampler(100, 64, seed=0).shift_offsets(5, 3, views=2)
    assert first.shape == second.shape == (64, 2)
    assert int(first.min()) >= 0 and int(first.max()) <= 6 and not torch.equal(first, second)


@pytest.mark.parametrize("field,value", [("steps", 0), ("lr", 0.0), ("warmup_steps", 10_000),
                                         ("device", "tpu"), ("augment_shift", 99)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trains_on_cuda_with_bf16_autocast(tmp_path):
    policy = tiny_policy()
    metrics = train(policy, SyntheticDemos(), TrainConfig(steps=20, batch_size=8, warmup_steps=2, lr=3e-3,
                                                          device="cuda", log_every=5), tmp_path)
    assert metrics["train/loss"] < 1.0 and next(policy.parameters()).is_cuda
