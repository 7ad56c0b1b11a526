"""Learned completion (robolora.completion): the policies' features hook, demos recorded past success, a head that
separates goal-reached frames from the rest, its files in the adapter folder (validated, refused whole), the 2%
budget, the train-completion command, and export with a second output ``done`` (parity on both; bundles without a
head unchanged). Tiny policies and Reach demos throughout."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from robolora.adapters import attach_active, load_adapter, save_adapter
from robolora.cli import main
from robolora.completion import (FILE, Completion, CompletionConfig, CompletionHead, EpisodeFeatures, check_budget,
                                 completion_labels, fit_head, head_metrics, switch_tick, train_completion)
from robolora.controller import load_bundle
from robolora.data import collect
from robolora.export import export_bundle, probe_inputs
from robolora.policies import ACTConfig, ACTPolicy, save_policy
from robolora.policy import check_policy
from test_adapters import tiny, trained_adapter

REACH = "robolora/Reach-v0"


def small_adapter():
    """Rank 1 on attn.q of the tiny base: 160 parameters, so a head fits the 2% budget (844 of 42,228)."""
    return trained_adapter(rank=1, targets=("attn.q",))


def synthetic_episodes(n: int = 24, dim: int = 32, seed: int = 0) -> list[EpisodeFeatures]:
    """Episodes whose features move along one direction once the goal is reached (after step 20 to 30)."""
    direction = torch.randn(dim, generator=torch.Generator().manual_seed(1234))  # the same in every set
    g = torch.Generator().manual_seed(seed)
    episodes = []
    for _ in range(n):
        first = int(torch.randint(20, 30, (1,), generator=g))
        length = first + 10
        success = np.zeros(length, dtype=bool)
        success[first:] = True
        features = torch.randn(length, dim, generator=g)
        features[first:] += 6.0 * direction / direction.norm()
        episodes.append(EpisodeFeatures(features, success))
    return episodes


def head_completion(feature_dim: int = 32, seed: int = 0) -> Completion:
    torch.manual_seed(seed)
    head = CompletionHead(feature_dim, 8).eval().requires_grad_(False)
    return Completion(head, 0.8, 3, 40, {"validation": {"precision": 0.9, "recall": 0.8}})


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reach_demos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reach_post")
    collect(REACH, 6, out, seed=0, post_success=4)
    return out


# --------------------------------------------------------------------------------------------- the hook


@pytest.mark.parametrize("make", [tiny, lambda: ACTPolicy(ACTConfig.preset("tiny")).eval()], ids=["visuomotor", "act"])
def test_features_hook_gives_b_by_feature_dim_and_leaves_actions_alone(make):
    policy = make()
    spec = check_policy(policy, features=True)
    probe = probe_inputs(policy, 3)
    with torch.no_grad():
        before = policy.predict_chunk(probe)
        features = policy.features(probe)
        after = policy.predict_chunk(probe)
    assert features.shape == (3, spec.feature_dim) == (3, policy.config.d_model)
    assert torch.isfinite(features).all() and torch.equal(before, after)


def test_a_policy_without_the_hook_is_told_what_it_lacks():
    policy = tiny()
    policy_spec = dataclasses.replace(policy.spec, feature_dim=None)

    class NoFeatures(type(policy)):
        spec = property(lambda self: policy_spec)

    with pytest.raises(TypeError, match="observation-features hook"):
        check_policy(NoFeatures(policy.config), features=True)
    with pytest.raises(ValueError, match="feature_dim"):
        dataclasses.replace(policy.spec, feature_dim=0)


# --------------------------------------------------------------------------------------------- labels, head


def test_labels_start_at_the_first_success_step_with_an_optional_lead():
    success = np.array([0, 0, 0, 1, 1, 0, 1], dtype=np.uint8)
    assert completion_labels(success).tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert completion_labels(success, lead=2).tolist() == [0, 1, 1, 1, 1, 1, 1]
    assert completion_labels(np.zeros(4)).tolist() == [0, 0, 0, 0]
    assert switch_tick(np.array([0.9, 0.2, 0.9, 0.9, 0.9]), 0.8, 3) == 4
    assert switch_tick(np.array([0.9, 0.9]), 0.8, 3) is None


def test_head_training_separates_goal_reached_frames_from_the_rest():
    episodes = synthetic_episodes()
    completion, metrics = fit_head(episodes, CompletionConfig(steps=300, seed=1))
    val = completion.info["validation"]
    assert val["precision"] >= 0.95 and val["recall"] >= 0.9, val
    assert val["premature_episodes"] == 0 and val["missed_episodes"] == 0
    assert 0.5 <= completion.threshold < 1 and completion.k == 3
    assert completion.timeout_ticks == int(np.ceil(1.5 * max(e.ticks_to_success for e in episodes))) + 3 - 1
    assert metrics["completion/val_precision"] == val["precision"]
    # the normalisation is folded into the first layer: the head reads raw features
    test = synthetic_episodes(8, seed=5)
    assert head_metrics(completion, test)["precision"] >= 0.9


# --------------------------------------------------------------------------------------------- files


def test_head_saves_and_loads_with_the_adapter_bit_exactly(tmp_path):
    adapter = dataclasses.replace(small_adapter(), completion=head_completion())
    save_adapter(adapter, tmp_path / "wipe")
    meta = json.loads((tmp_path / "wipe" / "adapter.json").read_text())
    assert meta["completion"]["sizes"] == [32, 8, 1] and meta["completion"]["threshold"] == 0.8
    assert meta["parameters"] == adapter.num_parameters  # the head is counted apart from the LoRA weights
    loaded = load_adapter(tmp_path / "wipe")
    for name, tensor in adapter.completion.tensors().items():
        assert torch.equal(loaded.completion.tensors()[name], tensor)
    assert (loaded.completion.threshold, loaded.completion.k, loaded.completion.timeout_ticks) == (0.8, 3, 40)
    assert loaded.completion.info["validation"] == {"precision": 0.9, "recall": 0.8}
    assert "completion" not in loaded.metadata
    assert load_adapter(tmp_path / "wipe").completion is not None and small_adapter().completion is None


@pytest.mark.parametrize("damage, message", [
    ("nan", "NaN or Inf"),
    ("shape", "do not belong together"),
    ("no_file", "not completion.safetensors"),
    ("no_entry", "not a \"completion\" entry"),
    ("threshold", "threshold"),
])
def test_bad_completion_files_are_refused_and_nothing_is_changed(tmp_path, damage, message):
    folder = tmp_path / "wipe"
    save_adapter(dataclasses.replace(small_adapter(), completion=head_completion()), folder)
    tensors = load_file(str(folder / FILE))
    meta = json.loads((folder / "adapter.json").read_text())
    if damage == "nan":
        tensors["fc1.weight"][0, 0] = float("nan")
        save_file(tensors, str(folder / FILE))
    elif damage == "shape":
        tensors["fc1.weight"] = tensors["fc1.weight"][:, :16].contiguous()
        save_file(tensors, str(folder / FILE))
    elif damage == "no_file":
        (folder / FILE).unlink()
    elif damage == "no_entry":
        del meta["completion"]
    else:
        meta["completion"]["threshold"] = 1.5
    (folder / "adapter.json").write_text(json.dumps(meta))
    before = {p.name: sha(p) for p in folder.iterdir()}
    policy = tiny()
    state = {k: v.clone() for k, v in policy.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        attach_active(policy, load_adapter(folder))
    assert {p.name: sha(p) for p in folder.iterdir()} == before
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in state.items())


def test_over_budget_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"over the 2% budget \(844\); the adapter alone leaves no room"):
        train_completion(tiny(), trained_adapter(), [tmp_path / "no_such_demos"])  # 2,080 + 273 > 844
    totals = check_budget(160, CompletionHead(32, 8), 42228)
    assert totals["completion/total_parameters"] == 160 + 32 * 8 + 8 + 8 + 1
    with pytest.raises(ValueError, match=r"--hidden 5\)"):  # 650 + 5 * 34 + 1 <= 844 < 650 + 6 * 34 + 1
        check_budget(650, CompletionHead(32, 8), 42228)
    with pytest.raises(ValueError, match="linear head"):  # 810 + 33 <= 844
        check_budget(810, CompletionHead(32, 8), 42228)


# --------------------------------------------------------------------------------------------- demos and training


def test_post_success_demos_run_on_past_the_goal(reach_demos, tmp_path):
    manifest = json.loads((reach_demos / "manifest.json").read_text())
    assert manifest["post_success"] == 4 and all(e["success"] for e in manifest["episodes"])
    from safetensors.numpy import load_file as load_numpy

    for entry in manifest["episodes"]:
        success = load_numpy(str(reach_demos / entry["file"]))["success"]
        first = int(np.argmax(success))
        assert len(success) == first + 1 + 4 == entry["length"]
    with pytest.raises(ValueError, match="post_success"):
        collect(REACH, 6, reach_demos, seed=0)  # resuming with other settings would mix the demos
    with pytest.raises(ValueError, match="post_success"):
        collect(REACH, 1, tmp_path / "x", post_success=-1)

def test_bc_dataset_clones_demos_up_to_success_only(reach_demos, tmp_path):
    """Post-success frames are for completion heads; behaviour cloning stops at the step that reached the goal, with
    the same samples (and statistics) as demos collected without post_success on the same seeds."""
    from robolora.data import BCDataset

    plain_dir = tmp_path / "plain"
    collect(REACH, 6, plain_dir, seed=0)
    trimmed, plain = BCDataset([reach_demos], 8), BCDataset([plain_dir], 8)
    kept = BCDataset([reach_demos], 8, keep_post_success=True)
    assert len(kept) == len(trimmed) + 6 * 4
    assert torch.equal(trimmed.lengths, plain.lengths) and torch.equal(trimmed.actions, plain.actions)
    batch, reference = trimmed.get_batch(range(len(trimmed))), plain.get_batch(range(len(plain)))
    assert all(torch.equal(batch[k], reference[k]) for k in reference)
    assert np.allclose(trimmed.stats["action_mean"], plain.stats["action_mean"], atol=1e-6)



def test_train_completion_command_adds_a_head_and_keeps_the_adapter(reach_demos, tmp_path, capsys):
    base, folder = tmp_path / "base", tmp_path / "adapter"
    save_policy(tiny(), base)
    save_adapter(small_adapter(), folder)
    weights = sha(folder / "adapter.safetensors")
    assert main(["train-completion", "--skill", str(folder), "--data", str(reach_demos), "--base", str(base),
                 "--steps", "50", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["head_parameters"] == 273 and result["total_parameters"] == 433
    adapter = load_adapter(folder)
    assert sha(folder / "adapter.safetensors") == weights
    assert adapter.completion is not None and adapter.completion.info["data"] == [str(reach_demos)]
    assert set(adapter.completion.info["validation"]) >= {"precision", "recall", "episodes"}
    # over budget: refused with the fix in the message, the folder left as it was
    save_adapter(trained_adapter(), folder)
    before = {p.name: sha(p) for p in folder.iterdir()}
    assert main(["train-completion", "--skill", str(folder), "--data", str(reach_demos), "--base", str(base),
                 "--device", "cpu"]) == 2
    assert "budget" in capsys.readouterr().err
    assert {p.name: sha(p) for p in folder.iterdir()} == before


# --------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def head_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("completion_bundles")
    adapter = dataclasses.replace(small_adapter(), completion=head_completion())
    save_adapter(adapter, root / "adapter")
    return root, export_bundle(tiny(), root / "adapter", root / "with_head"), \
        export_bundle(tiny(), small_adapter(), root / "plain")


def test_export_with_a_head_has_a_done_output_matching_torch(head_bundle):
    root, meta, _ = head_bundle
    graph = onnx.load(str(root / "with_head" / "policy.onnx")).graph
    assert [o.name for o in graph.output] == ["actions", "done"]
    assert meta["completion"] == {"threshold": 0.8, "k": 3, "timeout_ticks": 40, "output": "done", "parameters": 273,
                                  "validation": {"precision": 0.9, "recall": 0.8}}
    assert [o["name"] for o in meta["outputs"]] == ["actions", "done"]
    for key in ("onnx_vs_merged", "pt2_vs_merged", "safetensors_vs_merged", "unmerged_vs_merged"):
        assert meta["parity"][key] <= 1e-5 and meta["parity"][f"done/{key}"] <= 1e-5, meta["parity"]
    # independently: the controller's session against the unmerged skill and its head on a new probe
    policy = tiny()
    adapter = load_adapter(root / "adapter")
    attach_active(policy, adapter)
    probe = probe_inputs(policy, 4, seed=321)
    with torch.no_grad():
        actions = policy.predict_chunk(probe).numpy()
        done = adapter.completion.head.probability(policy.features(probe)).numpy()
    controller = load_bundle(root / "with_head")
    got_actions, got_done = controller.session.run(["actions", "done"], {k: probe[k].numpy()
                                                                          for k in ("rgb_front", "proprio")})
    assert got_done.shape == (4,) and np.abs(got_done - done).max() <= 1e-5
    assert np.abs(got_actions - actions).max() <= 1e-5


def test_bundle_without_a_head_is_as_before(head_bundle):
    root, _, plain = head_bundle
    graph = onnx.load(str(root / "plain" / "policy.onnx")).graph
    assert [o.name for o in graph.output] == ["actions"]
    assert "completion" not in plain and "outputs" not in plain
    assert not [k for k in plain["parity"] if k.startswith("done/")]


# --------------------------------------------------------------------------------------------- the image branch


def patch_episodes(n: int = 16, size: int = 16, seed: int = 0) -> list[EpisodeFeatures]:
    """Gray frames with a 2x2 brown spot somewhere until the goal is reached (step 12 to 20), none after; the
    policy features are noise: only the image says whether the goal is reached."""
    g = torch.Generator().manual_seed(seed)
    episodes = []
    for _ in range(n):
        first = int(torch.randint(12, 20, (1,), generator=g))
        length = first + 8
        images = torch.full((length, size, size, 3), 194, dtype=torch.uint8)
        for t in range(first):
            y, x = (int(v) for v in torch.randint(0, size - 2, (2,), generator=g))
            images[t, y:y + 2, x:x + 2] = torch.tensor([123, 70, 18], dtype=torch.uint8)
        success = np.zeros(length, dtype=bool)
        success[first:] = True
        episodes.append(EpisodeFeatures(torch.zeros(length, 0), success, images))
    return episodes


def image_completion(feature_dim: int = 32, channels: int = 2, seed: int = 0) -> Completion:
    torch.manual_seed(seed)
    head = CompletionHead(feature_dim, 4, channels, 3, "rgb_front").eval().requires_grad_(False)
    return Completion(head, 0.6, 5, 40, {"validation": {"precision": 0.9, "recall": 0.8}})


def test_image_branch_sees_a_small_spot_that_the_features_do_not():
    completion, _ = fit_head(patch_episodes(), CompletionConfig(features=False, image_channels=2, hidden=4,
                                                                steps=300, image_key="rgb_front", k=2, seed=1))
    head = completion.head
    assert head.feature_dim == 0 and head.image_channels == 2 and head.sizes == [4, 4, 1]
    assert head.num_parameters == 2 * (3 * 9 + 1) + 4 * 4 + 4 + 4 + 1
    test = head_metrics(completion, patch_episodes(8, seed=7))
    assert test["precision"] >= 0.95 and test["recall"] >= 0.95, test
    assert test["premature_episodes"] == 0 and test["missed_episodes"] == 0
    with pytest.raises(ValueError, match="camera image 'rgb_front'"):
        head(None, None)
    with pytest.raises(ValueError, match="image branch"):
        CompletionConfig(features=False)


def test_image_head_files_round_trip_and_feature_only_entries_load_as_before(tmp_path):
    adapter = dataclasses.replace(small_adapter(), completion=image_completion())
    save_adapter(adapter, tmp_path / "wipe")
    entry = json.loads((tmp_path / "wipe" / "adapter.json").read_text())["completion"]
    assert entry["sizes"] == [36, 4, 1] and entry["image"] == {"key": "rgb_front", "channels": 2, "kernel": 3,
                                                                "pools": ["max", "mean"], "mean_scale": 64.0}
    loaded = load_adapter(tmp_path / "wipe").completion
    policy = tiny()
    attach_active(policy, adapter)
    probe = probe_inputs(policy, 3, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded.head.read(policy, probe), adapter.completion.head.read(policy, probe))
    assert set(load_file(str(tmp_path / "wipe" / FILE))) == {"image.weight", "image.bias", "fc1.weight", "fc1.bias",
                                                            "fc2.weight", "fc2.bias"}
    # an entry without "image" is the feature-only head: no branch, the features only
    save_adapter(dataclasses.replace(small_adapter(), completion=head_completion()), tmp_path / "plain")
    assert "image" not in json.loads((tmp_path / "plain" / "adapter.json").read_text())["completion"]
    assert load_adapter(tmp_path / "plain").completion.head.image is None
    # an "image" entry that does not fit the file is refused
    entry["image"]["channels"] = 3
    meta = json.loads((tmp_path / "wipe" / "adapter.json").read_text())
    (tmp_path / "wipe" / "adapter.json").write_text(json.dumps({**meta, "completion": entry}))
    with pytest.raises(ValueError, match="do not belong together"):
        load_adapter(tmp_path / "wipe")


SHIPPED_HEADS = sorted((Path(__file__).parents[1] / "policies/pretrained/skills").glob("*/completion.safetensors"))


@pytest.mark.parametrize("path", SHIPPED_HEADS,
                         ids=lambda p: p.parent.name)
def test_shipped_heads_compute_what_their_files_say(path):
    """Each shipped head's probability is the plain formula on its file's tensors: Linear-GELU-Linear on the
    features, after the image branch's pooled maps when the entry has one."""
    assert {p.parent.name for p in SHIPPED_HEADS} >= {"wipe", "dish_rack"}
    completion = load_adapter(path.parent).completion
    t = load_file(str(path))
    g = torch.Generator().manual_seed(0)
    features = torch.randn(5, 128, generator=g)
    image = torch.randint(0, 256, (5, 64, 64, 3), generator=g, dtype=torch.uint8)
    x = features
    if "image.weight" in t:
        maps = torch.relu(torch.nn.functional.conv2d(image.permute(0, 3, 1, 2).float() / 255, t["image.weight"],
                                                     t["image.bias"], padding=t["image.weight"].shape[-1] // 2))
        pooled = torch.cat([maps.flatten(2).amax(-1), 64 * maps.flatten(2).mean(-1)], -1)
        x = pooled if completion.head.feature_dim == 0 else torch.cat([features, pooled], -1)
    want = torch.sigmoid(torch.nn.functional.gelu(x @ t["fc1.weight"].T + t["fc1.bias"]) @ t["fc2.weight"].T
                         + t["fc2.bias"])[:, 0]
    with torch.no_grad():
        got = completion.head.probability(features if completion.head.reads_features else None,
                                          image if completion.head.image is not None else None)
    assert torch.allclose(got, want, atol=1e-6)


def test_budget_counts_the_image_branch_and_names_the_widest_hidden_layer():
    head = CompletionHead(32, 8, 4, 3, "rgb_front")  # branch 4 * 28 = 112, inputs 32 + 8 = 40
    assert head.num_parameters == 112 + 40 * 8 + 8 + 8 + 1
    totals = check_budget(160, head, 42228)
    assert totals["completion/head_parameters"] == 449
    with pytest.raises(ValueError, match=r"--hidden 3\)"):  # 600 + 112 + 3 * 42 + 1 <= 844 < 600 + 112 + 4 * 42 + 1
        check_budget(600, head, 42228)


def test_export_carries_the_image_branch_in_done_with_parity(tmp_path):
    adapter = dataclasses.replace(small_adapter(), completion=image_completion())
    save_adapter(adapter, tmp_path / "adapter")
    meta = export_bundle(tiny(), tmp_path / "adapter", tmp_path / "bundle")
    assert meta["completion"]["image"]["channels"] == 2 and meta["completion"]["parameters"] == 2 * 28 + 36 * 4 + 9
    for key in ("onnx_vs_merged", "pt2_vs_merged", "safetensors_vs_merged", "unmerged_vs_merged"):
        assert meta["parity"][f"done/{key}"] <= 1e-5, meta["parity"]
    policy = tiny()
    attach_active(policy, adapter)
    probe = probe_inputs(policy, 4, seed=321)
    with torch.no_grad():
        done = adapter.completion.head.read(policy, probe).numpy()
    got = load_bundle(tmp_path / "bundle").session.run(["done"], {k: probe[k].numpy()
                                                                 for k in ("rgb_front", "proprio")})[0]
    assert got.shape == (4,) and np.abs(got - done).max() <= 1e-5


def test_train_completion_command_trains_an_image_head(reach_demos, tmp_path, capsys):
    base, folder = tmp_path / "base", tmp_path / "adapter"
    save_policy(tiny(), base)
    save_adapter(small_adapter(), folder)
    assert main(["train-completion", "--skill", str(folder), "--data", str(reach_demos), "--base", str(base),
                 "--no-features", "--image-channels", "2", "--hidden", "4", "--k", "2", "--steps", "20",
                 "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["head_parameters"] == 2 * 28 + 4 * 4 + 4 + 4 + 1 and result["k"] == 2
    head = load_adapter(folder).completion.head
    assert not head.reads_features and head.image_key == "rgb_front" and head.image_channels == 2
    assert main(["train-completion", "--skill", str(folder), "--data", str(reach_demos), "--base", str(base),
                 "--no-features", "--device", "cpu"]) == 2
    assert "image branch" in capsys.readouterr().err
