"""Tests for robolora.data: collect -> episode files + manifest -> BCDataset, on the real Reach task."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import robolora.envs
from robolora.data import BCDataset, collect, episode_filename, load_manifest

ENV = "robolora/Reach-v0"


@pytest.fixture(scope="module")
def reach_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reach")
    collect(ENV, 4, out, seed=7)
    return out


def _content(path: Path) -> tuple[dict[str, str], dict[str, bytes]]:
    """Metadata and tensor bytes of an episode file (safetensors writes metadata keys in arbitrary order)."""
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
    return metadata, {name: array.tobytes() for name, array in load_file(str(path)).items()}


def _episodes(folder: Path) -> list[dict[str, np.ndarray]]:
    return [load_file(str(folder / entry["file"])) for entry in load_manifest(folder)["episodes"]]


def test_episode_files_follow_the_format(reach_set: Path) -> None:
    manifest = load_manifest(reach_set)
    assert manifest["env_id"] == ENV and manifest["task"] == "reach" and manifest["cameras"] == ["front"]
    assert [entry["seed"] for entry in manifest["episodes"]] == [7, 8, 9, 10]
    for entry, episode in zip(manifest["episodes"], _episodes(reach_set)):
        length = entry["length"]
        assert episode["obs.rgb_front"].shape == (length, 64, 64, 3) and episode["obs.rgb_front"].dtype == np.uint8
        assert episode["obs.proprio"].shape == (length, 10) and episode["obs.proprio"].dtype == np.float32
        assert episode["action"].shape == episode["action_exec"].shape == (length, 4)
        assert np.abs(episode["action_exec"]).max() <= 1.0
        assert not np.allclose(episode["action"], episode["action_exec"])  # DART: executed = clean + noise
        assert episode["success"].dtype == np.uint8 and episode["success"][-1] == 1 and entry["success"]


def test_manifest_stats_match_the_episodes(reach_set: Path) -> None:
    manifest = load_manifest(reach_set)
    episodes = _episodes(reach_set)
    proprio = np.concatenate([e["obs.proprio"] for e in episodes]).astype(np.float64)
    action = np.concatenate([e["action"] for e in episodes]).astype(np.float64)
    stats = manifest["stats"]
    np.testing.assert_allclose(stats["proprio_mean"], proprio.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats["proprio_std"], proprio.std(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats["action_mean"], action.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats["action_min"], action.min(0))
    np.testing.assert_allclose(stats["action_max"], action.max(0))
    assert manifest["counts"]["steps"] == len(action) and manifest["counts"]["episodes"] == 4
    assert manifest["success_rate"] == 1.0 and manifest["failed_seeds"] == []


def test_bc_dataset_items_and_chunk_padding(reach_set: Path) -> None:
    dataset = BCDataset([reach_set], chunk_size=8)
    episodes = _episodes(reach_set)
    assert len(dataset) == sum(len(e["action"]) for e in episodes)
    item = dataset[0]
    assert item["rgb_front"].shape == (64, 64, 3) and item["rgb_front"].dtype == torch.uint8
    assert item["proprio"].shape == (10,) and item["proprio"].dtype == torch.float32
    assert item["task_id"].dtype == torch.int64 and item["task_id"].ndim == 0
    assert int(item["task_id"]) == list(robolora.envs.TASKS).index("reach")
    assert item["action"].shape == (8, 4) and item["action_is_pad"].dtype == torch.bool
    first = episodes[0]
    np.testing.assert_array_equal(item["rgb_front"].numpy(), first["obs.rgb_front"][0])
    # Second-last step of the second episode: 2 real actions, then its last action repeated and flagged.
    length = len(episodes[1]["action"])
    item = dataset[len(first["action"]) + length - 2]
    np.testing.assert_array_equal(item["proprio"].numpy(), episodes[1]["obs.proprio"][length - 2])
    np.testing.assert_array_equal(item["action"][:2].numpy(), episodes[1]["action"][-2:])
    assert torch.equal(item["action"][2:], item["action"][1:2].expand(6, 4))
    assert item["action_is_pad"].tolist() == [False, False] + [True] * 6
    assert dataset.stats["proprio_std"].min() >= 1e-2


def test_bc_dataset_combines_folders_and_task_ids(reach_set: Path) -> None:
    single = BCDataset([reach_set], chunk_size=4)
    double = BCDataset([reach_set, reach_set], chunk_size=4, task_ids={"reach": 3})
    assert len(double) == 2 * len(single) and int(double[len(single)]["task_id"]) == 3
    torch.testing.assert_close(double.stats["proprio_mean"], single.stats["proprio_mean"])
    torch.testing.assert_close(double.stats["proprio_std"], single.stats["proprio_std"])
    with pytest.raises(ValueError, match="no id in task_ids"):
        BCDataset([reach_set], chunk_size=4, task_ids={"push": 1})


def test_bc_dataset_works_with_dataloader_workers(reach_set: Path) -> None:
    dataset = BCDataset([reach_set], chunk_size=8)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=2, shuffle=False)
    frames = torch.cat([batch["rgb_front"] for batch in loader])
    expected = np.concatenate([e["obs.rgb_front"] for e in _episodes(reach_set)])
    np.testing.assert_array_equal(frames.numpy(), expected)


def test_resume_recollects_only_missing_or_corrupt_files(reach_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    out.mkdir()
    for path in reach_set.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    original = {i: _content(out / episode_filename(i)) for i in range(4)}
    (out / episode_filename(1)).unlink()
    with open(out / episode_filename(2), "r+b") as handle:  # truncated, as after a crash mid-copy
        handle.truncate(os.path.getsize(out / episode_filename(2)) // 2)
    untouched = os.stat(out / episode_filename(3)).st_mtime_ns
    counts: list[int] = []
    manifest = collect(ENV, 4, out, seed=7, progress=counts.append)
    assert counts == [2, 3, 4]
    assert os.stat(out / episode_filename(3)).st_mtime_ns == untouched
    for i in range(4):
        assert _content(out / episode_filename(i)) == original[i]  # same seed -> identical content
    assert manifest == json.loads((reach_set / "manifest.json").read_text())


def test_collecting_fewer_than_present_keeps_every_episode(reach_set: Path, tmp_path: Path) -> None:
    for path in reach_set.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    manifest = collect(ENV, 2, tmp_path, seed=7)
    assert manifest == load_manifest(reach_set)
    assert len(BCDataset([tmp_path], chunk_size=8, max_episodes=4).files) == 4


def test_parallel_collection_equals_serial(reach_set: Path, tmp_path: Path) -> None:
    manifest = collect(ENV, 4, tmp_path, seed=7, workers=2)
    assert manifest == load_manifest(reach_set)
    for i in range(4):
        assert _content(tmp_path / episode_filename(i)) == _content(reach_set / episode_filename(i))


def test_failed_seeds_are_skipped_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_make_expert = robolora.envs.make_expert

    class IdleOnSeed8:
        """The real expert, except that it never moves on seed 8 (so that episode times out)."""

        def __init__(self, env, seed=None):  # noqa: ANN001 - mirrors make_expert
            self.inner, self.idle = real_make_expert(env, seed=seed), seed == 8
            self.default_noise = self.inner.default_noise

        def reset(self) -> None:
            self.inner.reset()

        def act(self) -> np.ndarray:
            return np.zeros(4, np.float32) if self.idle else self.inner.act()

        def perturb(self, clean: np.ndarray, noise: float) -> np.ndarray:
            return clean if self.idle else self.inner.perturb(clean, noise)

    monkeypatch.setattr(robolora.envs, "make_expert", IdleOnSeed8)
    manifest = collect(ENV, 3, tmp_path, seed=7)
    assert [entry["seed"] for entry in manifest["episodes"]] == [7, 9, 10]
    assert manifest["failed_seeds"] == [8] and manifest["success_rate"] == pytest.approx(3 / 4)
    kept = collect(ENV, 3, tmp_path / "all", seed=7, only_successful=False)
    assert [entry["success"] for entry in kept["episodes"]] == [True, False, True]


def test_resume_with_other_settings_is_refused(reach_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    out.mkdir()
    (out / episode_filename(0)).write_bytes((reach_set / episode_filename(0)).read_bytes())
    with pytest.raises(ValueError, match="noise"):
        collect(ENV, 2, out, seed=7, noise=0.05)


def test_clear_errors_for_non_datasets_and_corrupt_files(reach_set: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a robolora dataset"):
        BCDataset([tmp_path], chunk_size=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_manifest(tmp_path / "nowhere")
    for path in reach_set.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    with open(tmp_path / episode_filename(3), "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(ValueError, match=episode_filename(3)):
        BCDataset([tmp_path], chunk_size=8)
    with pytest.raises(ValueError, match="episodes must be >= 1"):
        collect(ENV, 0, tmp_path / "x")


def test_quiet_phases_are_recorded_and_an_older_expert_folder_is_refused(tmp_path: Path) -> None:
    manifest = collect("robolora/DishRack-v0", 1, tmp_path, seed=0)
    assert manifest["quiet_phases"] == ["align", "insert", "release"]
    path = tmp_path / episode_filename(0)
    arrays = load_file(str(path))
    with safe_open(str(path), framework="numpy") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "quiet_phases"}
    save_file(arrays, str(path), metadata=metadata)  # as recorded before dish_rack's expert had quiet phases
    with pytest.raises(ValueError, match="quiet_phases"):
        collect("robolora/DishRack-v0", 2, tmp_path, seed=0)
