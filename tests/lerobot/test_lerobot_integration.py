"""robolora on a real LeRobot ACT and LeRobotDataset v3 (robolora.integrations; the lerobot extra, Python >= 3.12):

    .venv-lerobot/bin/python -m pytest -q -m lerobot tests/lerobot

A tiny ACT (dim 64, 1 encoder + 1 decoder layer, resnet18 without pretrained weights, 32 px) is built from its config
on robolora demos converted to a LeRobotDataset, saved as LeRobot saves a policy, and loaded back through
``load_lerobot_policy``; nothing is downloaded. Properties: the wrapper computes what LeRobot's own pipeline
computes; LoRA reaches ACT's attention and MLP under LeRobot's names and a fresh adapter changes nothing; a skill
trains with robolora's loop on the LeRobot dataset touching only LoRA weights; every SkillManager mode switches and
restores the base bit-exactly; the exported bundle matches torch and the torch-free controller acts like the torch
policy; the dataset round-trips through LeRobot's reader; PEFT adapters cross both ways; bad input is refused by name
with nothing changed.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lerobot.configs")  # not just "lerobot": this folder is one too, as a namespace package
pytestmark = pytest.mark.lerobot

from make_fixtures import FIXTURES, collect_demos, save_tiny_act  # noqa: E402

from robolora import LoRAConfig, SkillManager, inject_lora, lora_layers  # noqa: E402
from robolora.adapters import SkillAdapter, adapter_from_policy, load_adapter, save_adapter, to_peft  # noqa: E402
from robolora.integrations.lerobot import LeRobotPolicy, load_lerobot_policy  # noqa: E402
from robolora.integrations.lerobot_data import LeRobotFrames, to_lerobot_dataset, train_lerobot_skill  # noqa: E402,E501
from robolora.policies import base_fingerprint  # noqa: E402

TARGETS = LeRobotPolicy.lora_targets + LeRobotPolicy.lora_mlp_targets
PEFT_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """robolora reach demos -> a LeRobotDataset v3 -> a tiny ACT on its features and statistics, saved."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    root = tmp_path_factory.mktemp("lerobot")
    demos = collect_demos(root / "demos")
    info = to_lerobot_dataset(demos, root / "dataset")
    act = save_tiny_act(root / "act", LeRobotDatasetMetadata(info["repo_id"], root=root / "dataset"))
    return {"root": root, "demos": demos, "dataset": root / "dataset", "act": act, "repo_id": info["repo_id"]}


def lerobot_pipeline(folder: Path) -> tuple:
    """The ACT, pre- and post-processor exactly as LeRobot loads them."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.act.modeling_act import ACTPolicy
    from lerobot.policies.factory import make_pre_post_processors

    config = PreTrainedConfig.from_pretrained(folder)
    policy = ACTPolicy.from_pretrained(folder, config=config)
    return (policy, *make_pre_post_processors(config, pretrained_path=str(folder)))


def lerobot_actions(policy: torch.nn.Module, pre: object, post: object, probe: dict) -> torch.Tensor:
    batch = {"observation.images.front": probe["rgb_front"].permute(0, 3, 1, 2).float() / 255.0,
             "observation.state": probe["proprio"]}
    return post(policy.predict_action_chunk(pre(batch)))


def random_skill(policy: LeRobotPolicy, name: str, seed: int) -> SkillAdapter:
    """A rank-2 adapter with random B on every attention projection and MLP of a (fresh, plain) LeRobot ACT."""
    inject_lora(policy, LoRAConfig(rank=2, alpha=4.0, targets=TARGETS), name,
                generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for layer in lora_layers(policy).values():
            layer.lora_B[name].normal_(0.0, 0.05, generator=torch.Generator().manual_seed(seed))
    return adapter_from_policy(policy, name)


def test_fixtures_have_the_layout_lerobot_writes(work: dict[str, Path]) -> None:
    written = json.loads((work["act"] / "config.json").read_text())
    fixture = json.loads((FIXTURES / "act_config.json").read_text())
    assert written == fixture  # regenerate with tests/lerobot/make_fixtures.py when lerobot changes its layout
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        assert json.loads((work["act"] / name).read_text()) == json.loads((FIXTURES / f"act_{name}").read_text())
    info = json.loads((work["dataset"] / "meta" / "info.json").read_text())
    assert info["features"].keys() == json.loads((FIXTURES / "dataset_info.json").read_text())["features"].keys()


def test_wrapper_computes_what_lerobots_own_pipeline_computes(work: dict[str, Path]) -> None:
    policy = load_lerobot_policy(work["act"])
    probe = policy.spec.probe(3)
    expected = lerobot_actions(*lerobot_pipeline(work["act"]), probe)
    assert torch.equal(policy.predict_chunk(probe), expected)  # same ops on the same numbers
    assert list(policy.spec.observation) == ["rgb_front", "proprio"] and policy.spec.chunk_size == 8


def test_lora_reaches_act_attention_and_mlp_and_a_fresh_adapter_changes_nothing(work: dict[str, Path]) -> None:
    policy = load_lerobot_policy(work["act"])
    probe = policy.spec.probe(2)
    before = policy.predict_chunk(probe)
    names = inject_lora(policy, LoRAConfig(rank=2, alpha=4.0, targets=TARGETS), "fresh")
    assert "model.encoder.layers.0.self_attn.q" in names and "model.decoder.layers.0.multihead_attn.out_proj" in names
    assert "model.encoder.layers.0.linear1" in names and len(names) == 16
    assert not any("vae_encoder" in n for n in names)
    assert torch.equal(policy.predict_chunk(probe), before)


def test_a_skill_trains_on_the_lerobot_dataset_touching_only_lora(work: dict[str, Path], tmp_path: Path) -> None:
    from robolora.train import TrainConfig

    config = TrainConfig(steps=4, batch_size=4, warmup_steps=1, device="cpu", log_every=1, checkpoint_every=4)
    info = train_lerobot_skill(work["act"], work["dataset"], tmp_path, config=config,
                               lora=LoRAConfig(rank=4, alpha=8.0, targets=TARGETS), action_bounds=(-1.0, 1.0))
    assert info["skill"] == "reach" and np.isfinite(info["train_metrics"]["train/loss"])
    assert "train/l1_loss" in info["train_metrics"] and info["trainable_percent_of_base"] < 5
    adapter = load_adapter(tmp_path / "adapter")
    assert adapter.base_fingerprint == base_fingerprint(load_lerobot_policy(work["act"]))  # the base did not move
    assert len(adapter.lora) == 16 and any(b.abs().sum() > 0 for _, b in adapter.lora.values())


def test_train_skill_command_trains_a_skill_on_a_lerobot_dataset(work: dict[str, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """`robolora train-skill --base <LeRobot ACT> --data <LeRobotDataset v3>`: the CLI path end to end."""
    from robolora.cli import main

    out = tmp_path / "run"
    assert main(["train-skill", "--base", str(work["act"]), "--data", str(work["dataset"]), "--out", str(out),
                 "--mlp", "--rank", "2", "--steps", "3", "--batch-size", "4", "--device", "cpu",
                 "--n-action-steps", "2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["skill"] == "reach" and info["out"] == str(out / "adapter") and info["samples"] > 0
    assert np.isfinite(info["train_metrics"]["train/loss"]) and info["execution"] == {"n_action_steps": 2}
    adapter = load_adapter(out / "adapter")
    assert len(adapter.lora) == 16 and adapter.config.rank == 2 and adapter.metadata["execution"]["n_action_steps"] == 2
    policy = load_lerobot_policy(work["act"])
    assert adapter.base_fingerprint == base_fingerprint(policy)  # the base did not move
    manager = SkillManager(policy, mode="bank")
    assert manager.attach("reach", adapter).live  # trained: it changes the actions
    manager.activate("reach")
    assert manager.predict_chunk(policy.spec.probe(2)).shape == (2, 8, 4)
    assert manager.execution.n_action_steps == 2  # the skill's own execution, applied with it
    manager.close()


def test_train_skill_selects_on_validation_and_evaluates_held_out_for_a_lerobot_act(
        work: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--demos / --select-episodes / --eval-episodes on the LeRobot path: the first N episodes only, rollouts in the
    skill's robolora env rendered as the ACT reads it, the best validation step kept and recorded."""
    from robolora.cli import main

    out = tmp_path / "run"
    assert main(["train-skill", "--base", str(work["act"]), "--data", str(work["dataset"]), "--out", str(out),
                 "--rank", "2", "--steps", "4", "--batch-size", "4", "--device", "cpu", "--demos", "2",
                 "--select-episodes", "2", "--select-every", "2", "--eval-episodes", "2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    everything = json.loads((work["dataset"] / "meta" / "info.json").read_text())["total_frames"]
    assert info["demos"] == 2 and 0 < info["samples"] < everything
    rates = {r["step"]: r["val/success_rate"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "val/success_rate" in r}
    assert sorted(rates) == [2, 4]
    best = max(rates.values())
    assert info["selection"] == {"step": max(s for s, r in rates.items() if r == best), "success_rate": best,
                                 "episodes": 2, "seed": 30_000_000}
    assert info["eval"]["eval/episodes"] == 2 and 0.0 <= info["eval"]["eval/success_rate"] <= 1.0
    adapter = load_adapter(out / "adapter")
    assert adapter.metadata["selection"] == info["selection"] and adapter.metadata["demos"] == 2


def test_a_skill_on_acts_resnet_backbone_switches_exports_and_crosses_to_peft(work: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    """LoRA on the convolutions of LeRobot's ACT (train-skill --conv): every backbone conv and the 1x1 input
    projection; the manager's skill gives the LoRA policy's actions, the export keeps parity, and PEFT's Conv2d LoRA
    on LeRobot's own ACT gives the same actions."""
    from peft import PeftModel

    from robolora.export import export_bundle
    from robolora.inject import set_active_adapter

    policy = load_lerobot_policy(work["act"])
    names = inject_lora(policy, LoRAConfig(rank=2, alpha=4.0, targets=LeRobotPolicy.lora_conv_targets), "look",
                        generator=torch.Generator().manual_seed(0))
    convs = [n for n, m in load_lerobot_policy(work["act"]).named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert sorted(names) == sorted(convs) and len(names) == 21  # resnet18: 20 convs, and the input projection
    with torch.no_grad():
        for layer in lora_layers(policy).values():
            layer.lora_B["look"].normal_(0.0, 0.02, generator=torch.Generator().manual_seed(1))
    set_active_adapter(policy, "look")
    adapter = adapter_from_policy(policy, "look")
    probe = policy.spec.probe(2)
    with torch.no_grad():
        expected = policy.predict_chunk(probe)
    manager = SkillManager(load_lerobot_policy(work["act"]), mode="bank")
    assert manager.attach("look", adapter).live
    manager.activate("look")
    with torch.no_grad():
        torch.testing.assert_close(manager.predict_chunk(probe), expected, atol=1e-5, rtol=1e-5)
    manager.close()
    report = export_bundle(load_lerobot_policy(work["act"]), adapter, tmp_path / "bundle")
    assert report["parity"]["max_abs_diff"] <= report["parity"]["tolerance"]
    to_peft(adapter, tmp_path / "peft", policy=load_lerobot_policy(work["act"]))
    act, pre, post = lerobot_pipeline(work["act"])
    model = PeftModel.from_pretrained(act, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs = lerobot_actions(model.base_model.model, pre, post, probe)
    assert (theirs - expected).abs().max() <= PEFT_TOLERANCE


@pytest.mark.parametrize("mode", ["bank", "inplace", "unmerged"])
def test_skill_manager_switches_a_lerobot_act(work: dict[str, Path], mode: str) -> None:
    policy = load_lerobot_policy(work["act"])
    a = random_skill(load_lerobot_policy(work["act"]), "a", 1)
    b = random_skill(load_lerobot_policy(work["act"]), "b", 2)
    fingerprint, probe = base_fingerprint(policy), policy.spec.probe(2)
    state = {k: v.clone() for k, v in policy.state_dict().items()}
    base = policy.predict_chunk(probe)
    manager = SkillManager(policy, mode=mode)
    assert manager.attach("a", a).live and manager.attach("b", b).live
    outputs = []
    for name in ("a", "b", "a", None):
        manager.activate(name)
        manager.reset()
        outputs.append(manager.predict_chunk(probe))
    assert not torch.allclose(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    assert torch.equal(outputs[3], base)
    manager.close()
    assert base_fingerprint(policy) == fingerprint and not lora_layers(policy)
    assert all(torch.equal(v, state[k]) for k, v in policy.state_dict().items())


def test_export_bundle_and_the_torch_free_controller_match_torch(work: dict[str, Path], tmp_path: Path) -> None:
    from robolora.controller import load_bundle
    from robolora.export import export_bundle

    policy = load_lerobot_policy(work["act"], action_bounds=(-1.0, 1.0))
    save_adapter(random_skill(load_lerobot_policy(work["act"]), "reach", 3), tmp_path / "skill")
    meta = export_bundle(policy, tmp_path / "skill", tmp_path / "bundle")  # reach: the env's proprio bounds too
    assert meta["inputs"] == ["rgb_front", "proprio"] and meta["parity"]["max_abs_diff"] < meta["parity"]["tolerance"]
    manager = SkillManager(policy, mode="bank")
    manager.load(tmp_path / "skill")
    manager.activate("reach")
    controller = load_bundle(tmp_path / "bundle")
    from robolora.envs import make

    env = make("reach", image_size=32)
    obs, _ = env.reset(seed=7)
    for _ in range(6):  # a chunk and a half: query, replay, query again
        action = controller.select_action(obs)
        np.testing.assert_allclose(action, manager.select_action(obs), atol=meta["parity"]["tolerance"])
        obs, *_ = env.step(action)
    env.close()


def test_eval_and_export_commands_take_a_lerobot_folder(work: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    """`robolora eval --policy` and `robolora export --base` on a LeRobot folder: the env is sized from the
    policy's spec (32 px here), bounds come from --action-bounds and are recorded in the bundle."""
    from robolora.cli import main

    assert main(["eval", "--policy", str(work["act"]), "--task", "reach", "--episodes", "2", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["results"][0]
    assert row["task"] == "reach" and row["episodes"] == 2 and 0.0 <= row["success"] <= 1.0
    save_adapter(random_skill(load_lerobot_policy(work["act"]), "reach", 4), tmp_path / "skill")
    assert main(["export", "--base", str(work["act"]), "--skill", str(tmp_path / "skill"), "--out",
                 str(tmp_path / "bundle"), "--action-bounds", "-1", "1", "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["parity"]["max_abs_diff"] < meta["parity"]["tolerance"] and meta["skill"] == "reach"
    assert meta["action"]["low"] == [-1.0] * 4 and meta["action"]["high"] == [1.0] * 4
    save_adapter(random_skill(load_lerobot_policy(work["act"]), "dish_rack", 5), tmp_path / "skill2")
    assert main(["rollout", "--base", str(work["act"]), "--skills", f"{tmp_path / 'skill'},{tmp_path / 'skill2'}",
                 "--switch", "schedule", "--schedule", "5", "--episodes", "1", "--json"]) == 0
    rollout = json.loads(capsys.readouterr().out)
    assert rollout["rollout/switches"] >= 1  # the LeRobot ACT ran both skills in the kitchen, switching on schedule


def test_convert_trims_post_success_frames_and_takes_the_first_episodes(tmp_path: Path) -> None:
    """Demos collected with post_success end at their first success, as BCDataset clones them, unless kept."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from safetensors.numpy import load_file

    from robolora.data import collect, load_manifest
    from robolora.envs import TASKS

    collect(TASKS["reach"], 2, tmp_path / "demos", image_size=32, post_success=4)
    manifest = load_manifest(tmp_path / "demos")
    first = load_file(str(tmp_path / "demos" / manifest["episodes"][0]["file"]))
    until_success = int(first["success"].nonzero()[0][0]) + 1
    assert until_success < len(first["action"])  # the recorded frames past success exist
    trimmed = to_lerobot_dataset(tmp_path / "demos", tmp_path / "trimmed", videos=False, max_episodes=1)
    kept = to_lerobot_dataset(tmp_path / "demos", tmp_path / "kept", videos=False, keep_post_success=True)
    assert trimmed["episodes"] == 1 and trimmed["frames"] == until_success
    assert kept["episodes"] == 2 and kept["frames"] == sum(e["length"] for e in manifest["episodes"])
    dataset = LeRobotDataset(trimmed["repo_id"], root=tmp_path / "trimmed")
    assert len(dataset) == until_success and bool(dataset[until_success - 1]["next.success"])
    with pytest.raises(ValueError, match="max_episodes"):
        to_lerobot_dataset(tmp_path / "demos", tmp_path / "none", max_episodes=0)


def test_demos_round_trip_through_lerobots_reader(work: dict[str, Path], tmp_path: Path) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from safetensors.numpy import load_file

    from robolora.data import load_manifest

    manifest = load_manifest(work["demos"])
    episodes = [load_file(str(work["demos"] / e["file"])) for e in manifest["episodes"]]
    png = to_lerobot_dataset(work["demos"], tmp_path / "png", videos=False)
    for root, lossless in ((work["dataset"], False), (tmp_path / "png", True)):
        dataset = LeRobotDataset(png["repo_id"], root=root, return_uint8=True)
        assert dataset.meta.total_episodes == len(episodes) and len(dataset) == manifest["counts"]["steps"]
        index = 0
        for episode in episodes:
            for t in range(len(episode["action"])):
                item = dataset[index]
                assert np.array_equal(item["observation.state"].numpy(), episode["obs.proprio"][t])
                assert np.array_equal(item["action"].numpy(), episode["action"][t])
                assert item["task"] == "reach"
                image = item["observation.images.front"]  # video: uint8; PNG: float in [0, 1]
                image = (image.float() * (255 if image.is_floating_point() else 1)).round()
                image = image.permute(1, 2, 0).numpy().astype(int)
                error = np.abs(image - episode["obs.rgb_front"][t].astype(int)).mean()
                assert error == 0 if lossless else error < 4  # mp4 (AV1) is lossy: about 2/255 per pixel
                index += 1


def test_peft_adapters_cross_both_ways(work: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel

    probe = load_lerobot_policy(work["act"]).spec.probe(2)
    # LeRobot's own PEFT LoRA (lerobot-train --peft) -> robolora's SkillManager
    act, pre, post = lerobot_pipeline(work["act"])
    act.config.pretrained_path = str(work["act"])
    peft_model = act.wrap_with_peft(peft_cli_overrides={
        "method_type": "lora", "r": 4, "target_modules": r"model\.(encoder|decoder)\.layers\.\d+\."
                                                          r"(self_attn|multihead_attn|linear1|linear2)"})
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(hash(name) % 1000))
    peft_model.save_pretrained(tmp_path / "peft")
    expected = lerobot_actions(peft_model, pre, post, probe)
    policy = load_lerobot_policy(work["act"])
    manager = SkillManager(policy, mode="bank")
    manager.load(tmp_path / "peft", name="from_peft")
    manager.activate("from_peft")
    assert (manager.predict_chunk(probe) - expected).abs().max() <= PEFT_TOLERANCE
    manager.close()
    # a robolora adapter -> PEFT's layout -> PeftModel on LeRobot's ACT
    adapter = random_skill(load_lerobot_policy(work["act"]), "ours", 4)
    to_peft(adapter, tmp_path / "ours_peft", policy=policy)
    manager = SkillManager(policy, mode="bank")
    manager.attach("ours", adapter)
    manager.activate("ours")
    ours = manager.predict_chunk(probe)
    act2, pre2, post2 = lerobot_pipeline(work["act"])
    theirs = lerobot_actions(PeftModel.from_pretrained(act2, tmp_path / "ours_peft"), pre2, post2, probe)
    assert (ours - theirs).abs().max() <= PEFT_TOLERANCE


def test_bad_input_is_refused_by_name_with_nothing_changed(work: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    policy = load_lerobot_policy(work["act"])
    fingerprint = base_fingerprint(policy)
    # an adapter trained on another ACT
    other = save_tiny_act(tmp_path / "other", LeRobotDatasetMetadata(work["repo_id"], root=work["dataset"]), seed=1)
    foreign = random_skill(load_lerobot_policy(other), "foreign", 5)
    manager = SkillManager(policy, mode="bank")
    with pytest.raises(ValueError, match="was trained on base"):
        manager.attach("foreign", foreign)
    assert manager.skills == [] and not lora_layers(policy) and base_fingerprint(policy) == fingerprint
    manager.close()
    # a LeRobot folder of an unsupported type
    unsupported = tmp_path / "diffusion"
    shutil.copytree(work["act"], unsupported)
    config = json.loads((unsupported / "config.json").read_text())
    (unsupported / "config.json").write_text(json.dumps({**config, "type": "diffusion"}))
    with pytest.raises(ValueError, match=r"'diffusion' is not supported; .* supports \['act'\]"):
        load_lerobot_policy(unsupported)
    # a dataset whose images do not fit the policy's inputs
    bigger = tmp_path / "act64"
    shutil.copytree(work["act"], bigger)
    config["input_features"]["observation.images.front"]["shape"] = [3, 64, 64]
    (bigger / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'observation.images.front' has shape \[32, 32, 3\].*\[64, 64, 3\]"):
        LeRobotFrames(work["dataset"], load_lerobot_policy(bigger))
    # lerobot missing
    monkeypatch.setitem(sys.modules, "lerobot", None)
    with pytest.raises(ImportError, match=r'pip install "robolora\[lerobot\]"'):
        load_lerobot_policy(work["act"])
