"""The LeRobot integration without lerobot (robolora.integrations): the install hint when lerobot is missing, the
spec read from a config.json in LeRobot's exact layout, LeRobot's normalisation from its processor files, dataset
feature checks against a LeRobotDataset v3 info.json, and the whole robolora loop (LoRA on ACT's attention and
MLP, every SkillManager mode, export + the torch-free controller) on a stand-in module with LeRobot ACT's structure.

The fixtures in tests/lerobot/fixtures/ are what lerobot 0.6.1 writes (tests/lerobot/make_fixtures.py); the test
group in tests/lerobot/ runs the same loop on the real LeRobot ACT.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from robolora import LoRAConfig, SkillManager, inject_lora, lora_layers
from robolora.adapters import adapter_from_policy, save_adapter
from robolora.integrations.lerobot import (FeatureNormalization, LeRobotFeatures, LeRobotNormalization,
                                           LeRobotPolicy, load_lerobot_policy, require_lerobot)
from robolora.integrations.lerobot_data import check_dataset_features, lerobot_features
from robolora.policies import base_fingerprint
from robolora.policy import check_policy

FIXTURES = Path(__file__).parent / "lerobot" / "fixtures"
ACT_LAYERS = [f"model.{stack}.layers.0.{module}" for stack, modules in
              (("encoder", ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.out_proj", "linear1", "linear2")),
               ("decoder", ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.out_proj", "multihead_attn.q",
                            "multihead_attn.k", "multihead_attn.v", "multihead_attn.out_proj", "linear1",
                            "linear2")))
              for module in modules]


def fixture_config() -> dict:
    return json.loads((FIXTURES / "act_config.json").read_text())


def fixture_normalization() -> LeRobotNormalization:
    def step(name: str, state_file: str) -> tuple[dict, dict]:
        config = json.loads((FIXTURES / f"act_{name}.json").read_text())
        step_config = next(s["config"] for s in config["steps"] if s.get("state_file", "").endswith(state_file))
        return step_config, load_file(str(FIXTURES / f"act_{name}_{state_file}"))

    return LeRobotNormalization.from_steps(*step("policy_preprocessor", "step_3_normalizer_processor.safetensors"),
                                           *step("policy_postprocessor", "step_0_unnormalizer_processor.safetensors"),
                                           ["observation.images.front", "observation.state"])


# ---------------------------------------------------------------------------------------- install hint, spec


def test_missing_lerobot_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lerobot", None)  # import lerobot raises ImportError, installed or not
    with pytest.raises(ImportError, match=r'pip install "robolora\[lerobot\]".*Python >= 3.12'):
        require_lerobot()


def test_core_robolora_never_imports_lerobot() -> None:
    code = ("import sys, robolora, robolora.cli, robolora.export, robolora.skills, robolora.train, "
            "robolora.integrations.lerobot, robolora.integrations.lerobot_data; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'lerobot'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_spec_maps_lerobot_features_to_robolora_keys() -> None:
    features = LeRobotFeatures.from_config(fixture_config())
    assert features.key_map == {"rgb_front": "observation.images.front", "proprio": "observation.state"}
    assert [f.robolora_shape for f in features.inputs] == [(32, 32, 3), (10,)]
    assert (features.action_dim, features.chunk_size, features.execution.n_action_steps) == (4, 8, 4)
    spec = LeRobotPolicy(StandInACT(), fixture_config(), fixture_normalization()).spec
    assert list(spec.observation) == ["rgb_front", "proprio"]
    assert spec.observation["rgb_front"].is_image and spec.observation["proprio"].mean is not None
    assert spec.task_key is None and spec.skill_token_dim is None


@pytest.mark.parametrize("change, message", [
    ({"type": "diffusion"}, r"type 'diffusion' is not supported.*\['act'\]"),
    ({"n_obs_steps": 2}, r"n_obs_steps=2"),
    ({"input_features": {"observation.images.front": {"type": "VISUAL", "shape": [1, 32, 32]}}}, r"\[3, H, W\]"),
    ({"input_features": {"observation.language": {"type": "LANGUAGE", "shape": [8]}}}, r"no robolora observation"),
    ({"output_features": {}}, r"output_features is missing"),
    ({"n_action_steps": 9}, r"n_action_steps=9"),
])
def test_bad_configs_are_refused_by_name(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LeRobotFeatures.from_config({**fixture_config(), **change})


def test_unsupported_folder_is_refused_before_lerobot_is_needed(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lerobot", None)
    (tmp_path / "config.json").write_text(json.dumps({**fixture_config(), "type": "pi0"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"'pi0' is not supported; .* supports \['act'\]"):
        load_lerobot_policy(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a saved LeRobot policy folder"):
        load_lerobot_policy(tmp_path / "missing")


# ------------------------------------------------------------------------------------------------ normalisation


def test_normalization_follows_lerobot_formulas_and_round_trips() -> None:
    stats = load_file(str(FIXTURES / "act_policy_preprocessor_step_3_normalizer_processor.safetensors"))
    norm = fixture_normalization()
    x = torch.rand(2, 10)
    mean, std = stats["observation.state.mean"], stats["observation.state.std"]
    torch.testing.assert_close(norm.input("observation.state").normalize(x), (x - mean) / (std + 1e-8), rtol=0,
                               atol=0)
    image = torch.rand(2, 3, 32, 32)
    assert norm.input("observation.images.front").normalize(image).shape == (2, 3, 32, 32)  # (3, 1, 1) stats
    action = torch.randn(2, 8, 4)
    varies = stats["action.std"] > 0  # a constant action (reach's open gripper) unnormalises to its mean, as in LeRobot
    round_trip = norm.action_out.unnormalize(norm.action_in.normalize(action))
    torch.testing.assert_close(round_trip[..., varies], action[..., varies])
    torch.testing.assert_close(round_trip[..., ~varies], stats["action.mean"][~varies].expand(2, 8, -1))
    low, high = torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 0.0])  # a zero range takes eps, as LeRobot does
    ranged = FeatureNormalization("MIN_MAX", {"min": low, "max": high}, eps=1e-8)
    torch.testing.assert_close(ranged.normalize(torch.tensor([0.0, 0.0])), torch.tensor([0.0, -1.0]))
    with pytest.raises(ValueError, match=r"needs the statistics \['q01', 'q99'\]"):
        FeatureNormalization("QUANTILES", {"min": low}, eps=1e-8)


def test_dataset_features_name_the_missing_or_misshapen_key() -> None:
    info = json.loads((FIXTURES / "dataset_info.json").read_text())["features"]
    features = LeRobotFeatures.from_config(fixture_config())
    check_dataset_features(info, features)
    assert {k: v["dtype"] for k, v in lerobot_features(["front"], 32).items()} == \
        {k: info[k]["dtype"] for k in ("observation.images.front", "observation.state", "action", "next.success")}
    with pytest.raises(ValueError, match=r"lacks the feature\(s\) \['observation.state'\]"):
        check_dataset_features({k: v for k, v in info.items() if k != "observation.state"}, features)
    small = {**info, "observation.images.front": {**info["observation.images.front"], "shape": [16, 16, 3]}}
    with pytest.raises(ValueError, match=r"'observation.images.front' has shape \[16, 16, 3\].*\[32, 32, 3\]"):
        check_dataset_features(small, features)


# --------------------------------------------------------------------- the loop on a stand-in for LeRobot's ACT


class StandInLayer(nn.Module):
    """LeRobot ACT's layer layout: seq-first ``self_attn`` (+ ``multihead_attn`` in the decoder), ``linear1/2``."""

    def __init__(self, d: int, cross: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, 2)
        self.multihead_attn = nn.MultiheadAttention(d, 2) if cross else None
        self.linear1, self.linear2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(x, x, value=x)[0]  # (S, B, D)
        if memory is not None:
            x = x + self.multihead_attn(x, memory, value=memory)[0]  # (K, B, D)
        return x + self.linear2(F.relu(self.linear1(x)))  # (S, B, D)


class StandInModel(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.image_proj = nn.Conv2d(3, d, kernel_size=8, stride=8)
        self.state_proj = nn.Linear(10, d)
        self.encoder, self.decoder = nn.Module(), nn.Module()
        self.encoder.layers = nn.ModuleList([StandInLayer(d, cross=False)])
        self.decoder.layers = nn.ModuleList([StandInLayer(d, cross=True)])
        self.queries = nn.Parameter(torch.randn(8, 1, d))
        self.action_head = nn.Linear(d, 4)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        image = self.image_proj(batch["observation.images.front"]).flatten(2).permute(2, 0, 1)  # (16, B, D)
        tokens = torch.cat([self.state_proj(batch["observation.state"])[None], image])  # (17, B, D)
        memory = self.encoder.layers[0](tokens)
        queries = self.queries.expand(-1, tokens.shape[1], -1)  # (K, B, D)
        return self.action_head(self.decoder.layers[0](queries, memory)).transpose(0, 1)  # (B, K, A)


class StandInACT(nn.Module):
    """A ``PreTrainedPolicy``'s interface as the wrapper uses it: ``model``, ``predict_action_chunk``, ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = StandInModel()

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.eval()
        return self.model(batch)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        err = (self.model(batch) - batch["action"]).abs() * ~batch["action_is_pad"].unsqueeze(-1)
        loss = err.sum() / (~batch["action_is_pad"]).sum().clamp_min(1) / 4
        return loss, {"l1_loss": loss.item()}


@pytest.fixture
def policy() -> LeRobotPolicy:
    """Frozen, as load_lerobot_policy returns it (nn.MultiheadAttention's numbers depend on requires_grad)."""
    policy = LeRobotPolicy(StandInACT(), fixture_config(), fixture_normalization(), action_bounds=(-1.0, 1.0))
    return policy.requires_grad_(False).eval()


def skill(policy: LeRobotPolicy, name: str, seed: int) -> object:
    trained = LeRobotPolicy(StandInACT(), fixture_config(), fixture_normalization()).eval()  # the same base weights
    targets = LeRobotPolicy.lora_targets + LeRobotPolicy.lora_mlp_targets
    inject_lora(trained, LoRAConfig(rank=2, alpha=4.0, targets=targets), name,
                generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for layer in lora_layers(trained).values():
            layer.lora_B[name].normal_(0.0, 0.2, generator=torch.Generator().manual_seed(seed))
    return adapter_from_policy(trained, name)


def test_lora_reaches_act_attention_and_mlp_under_lerobot_names(policy: LeRobotPolicy) -> None:
    check_policy(policy)
    assert [n for n, _ in policy.named_children()] == ["model", "normalization"]
    probe = policy.spec.probe(3)
    before = policy.predict_chunk(probe)
    names = inject_lora(policy, LoRAConfig(rank=2, alpha=4.0, targets=LeRobotPolicy.lora_targets +
                                           LeRobotPolicy.lora_mlp_targets), "fresh")
    assert sorted(names) == sorted(ACT_LAYERS)
    assert torch.equal(policy.predict_chunk(probe), before)  # a fresh adapter changes no output


@pytest.mark.parametrize("mode", ["bank", "inplace", "unmerged"])
def test_skill_manager_switches_lerobot_act_in_every_mode(policy: LeRobotPolicy, mode: str) -> None:
    fingerprint, probe = base_fingerprint(policy), policy.spec.probe(3)
    base = policy.predict_chunk(probe)
    manager = SkillManager(policy, mode=mode)
    assert manager.attach("a", skill(policy, "a", 1)).live and manager.attach("b", skill(policy, "b", 2)).live
    outputs = []
    for name in ("a", "b", "a", None):
        manager.activate(name)
        manager.reset()
        outputs.append(manager.predict_chunk(probe))
    assert not torch.allclose(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    assert torch.equal(outputs[3], base)  # the plain base again
    manager.close()
    assert base_fingerprint(policy) == fingerprint and not lora_layers(policy)


def test_export_bundle_holds_the_normalisation_and_the_controller_matches(policy: LeRobotPolicy,
                                                                          tmp_path: Path) -> None:
    from robolora.controller import load_bundle
    from robolora.export import export_bundle

    save_adapter(skill(policy, "wipe", 3), tmp_path / "wipe")
    meta = export_bundle(policy, tmp_path / "wipe", tmp_path / "bundle", env_id=None)
    assert meta["inputs"] == ["rgb_front", "proprio"] and meta["parity"]["max_abs_diff"] < 5e-5
    merged = SkillManager(policy, mode="bank")
    merged.load(tmp_path / "wipe")
    merged.activate("wipe")
    controller = load_bundle(tmp_path / "bundle")
    rng = np.random.default_rng(0)
    mean, std = (np.asarray(v, np.float32) for v in (policy.spec.observation["proprio"].mean,
                                                      policy.spec.observation["proprio"].std))
    for _ in range(6):  # a chunk and a half: the executors query, replay, query again in step
        obs = {"rgb_front": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
               "proprio": (mean + std * rng.standard_normal(10)).astype(np.float32)}
        np.testing.assert_allclose(controller.select_action(obs), merged.select_action(obs), atol=5e-5)


def test_a_skills_execution_reaches_the_bundle_through_the_protocol(policy: LeRobotPolicy, tmp_path: Path) -> None:
    """attach_active (export) reads the wrapper's spec, not a config: the skill's own execution is checked against
    the chunk size and recorded in the bundle; a bad one is refused with nothing written or changed."""
    from robolora.adapters import attach_active
    from robolora.export import export_bundle

    assert not hasattr(policy, "config")
    adapter = skill(policy, "wipe", 3)
    adapter.metadata["execution"] = {"n_action_steps": 9}  # chunk_size 8
    with pytest.raises(ValueError, match=r"n_action_steps=9 must be in \[1, chunk_size=8\]"):
        attach_active(policy, adapter)
    with pytest.raises(ValueError, match=r"n_action_steps=9"):
        export_bundle(policy, adapter, tmp_path / "bad")
    assert not lora_layers(policy) and policy.spec.execution.n_action_steps == 4 and not (tmp_path / "bad").exists()
    adapter.metadata["execution"] = {"n_action_steps": 1, "temporal_ensemble": 0.1}
    meta = export_bundle(policy, adapter, tmp_path / "bundle", env_id=None)
    assert meta["chunking"] == {"chunk_size": 8, "n_action_steps": 1, "temporal_ensemble": 0.1}
    assert policy.spec.execution.n_action_steps == 4  # export works on a copy


def test_an_adapter_of_another_act_is_refused_by_fingerprint(policy: LeRobotPolicy, tmp_path: Path) -> None:
    other = LeRobotPolicy(StandInACT(), fixture_config(), fixture_normalization()).eval()
    with torch.no_grad():
        other.model.action_head.bias.add_(0.1)  # another ACT: same architecture, other weights
    foreign = adapter_from_policy(inject_and_fill(other, "foreign"), "foreign")
    fingerprint, probe = base_fingerprint(policy), policy.spec.probe(2)
    before = policy.predict_chunk(probe)
    manager = SkillManager(policy, mode="bank")
    with pytest.raises(ValueError, match="was trained on base .* but this policy is base"):
        manager.attach("foreign", foreign)
    assert manager.skills == [] and not lora_layers(policy)
    manager.close()
    from robolora.export import export_bundle

    with pytest.raises(ValueError, match="was trained on base"):
        export_bundle(policy, foreign, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    assert base_fingerprint(policy) == fingerprint and torch.equal(policy.predict_chunk(probe), before)


def inject_and_fill(policy: LeRobotPolicy, name: str) -> LeRobotPolicy:
    inject_lora(policy, LoRAConfig(rank=2, alpha=4.0, targets=LeRobotPolicy.lora_targets), name,
                generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in lora_layers(policy).values():
            layer.lora_B[name].normal_(0.0, 0.2, generator=torch.Generator().manual_seed(0))
    return policy


# ------------------------------------------------------------------------ robolora train-skill on LeRobot folders


def lerobot_folders(root: Path, config: dict | None = None, info: dict | None = None) -> tuple[Path, Path]:
    """A LeRobot policy folder and a LeRobotDataset v3 folder as far as robolora reads them without lerobot: the
    fixture config.json (a placeholder model.safetensors) and the fixture meta/info.json."""
    act, data = root / "act", root / "data"
    act.mkdir(parents=True)
    (act / "config.json").write_text(json.dumps(config or fixture_config()))
    (act / "model.safetensors").write_bytes(b"")
    (data / "meta").mkdir(parents=True)
    (data / "meta" / "info.json").write_text(json.dumps(info or json.loads((FIXTURES / "dataset_info.json")
                                                                           .read_text())))
    return act, data


def test_train_skill_routes_lerobot_folders_to_train_lerobot_skill(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from robolora import cli
    from robolora.integrations import lerobot_data

    act, data = lerobot_folders(tmp_path)
    calls = []

    def fake(policy_folder, dataset_folder, out_dir, **kwargs):
        calls.append((Path(policy_folder), Path(dataset_folder), Path(out_dir), kwargs))
        return {"skill": kwargs["skill"] or "reach", "out": str(Path(out_dir) / "adapter"), "demos": 3, "samples": 42,
                "trainable_params": 10, "trainable_percent_of_base": 0.1,
                "train_metrics": {"train/loss": 0.5, "train/wall_s": 1.0}}

    monkeypatch.setattr(lerobot_data, "train_lerobot_skill", fake)
    run = tmp_path / "runs" / "act"  # a lerobot-train output folder stands for its last checkpoint
    (run / "checkpoints" / "last").mkdir(parents=True)
    act.rename(run / "checkpoints" / "last" / "pretrained_model")
    assert cli.main(["train-skill", "--base", str(run), "--data", str(data), "--out", str(tmp_path / "out"),
                     "--mlp", "--conv", "--rank", "2", "--steps", "5", "--n-action-steps", "2", "--skill", "pick",
                     "--demos", "3", "--select-episodes", "2", "--select-every", "4", "--eval-episodes", "6"]) == 0
    (base, dataset, out, kwargs), = calls
    assert base == run / "checkpoints" / "last" / "pretrained_model" and dataset == data
    assert out == tmp_path / "out" and kwargs["skill"] == "pick"
    assert kwargs["lora"].targets == (LeRobotPolicy.lora_targets + LeRobotPolicy.lora_mlp_targets
                                      + LeRobotPolicy.lora_conv_targets)
    assert kwargs["lora"].rank == 2 and kwargs["config"].steps == 5 and kwargs["config"].lr == 1e-3
    assert kwargs["execution"] == {"n_action_steps": 2} and kwargs["resume"] is False
    assert kwargs["demos"] == 3 and kwargs["select_episodes"] == 2 and kwargs["config"].eval_every == 4
    assert kwargs["eval_episodes"] == 6


@pytest.mark.parametrize("case, message", [
    ("lerobot missing", r'needs lerobot.*pip install "robolora\[lerobot\]" in a Python >= 3.12'),
    ("unsupported type", r"LeRobot policy type 'diffusion' is not supported; .* supports \['act'\]"),
    ("misshapen image", r"feature 'observation.images.front' has shape \[16, 16, 3\], the policy reads \[32, 32, 3\]"),
    ("missing state", r"lacks the feature\(s\) \['observation.state'\] the policy reads"),
    ("v2.1 dataset", r"is a LeRobotDataset v2.1; robolora reads LeRobotDataset v3.x.*convert_dataset_v21_to_v30"),
    ("robolora base", r"is a LeRobotDataset \(v3.0\); train on it with the LeRobot policy it fits: --base"),
    ("robolora demos", r"must be a LeRobotDataset v3 folder.*robolora convert --to lerobot"),
    ("full fine-tuning", r"--method full is not available for a LeRobot policy.*lerobot-train --policy.path="),
    ("no env to roll out", r"skill 'stack_cups' is not a robolora task \(.*reach.*\): name the env"),
    ("no demos", r"demos=0 \(--demos\): must be an int >= 1"),
    ("bad execution", r"n_action_steps=9 must be in \[1, chunk_size=8\]"),
])
def test_train_skill_refuses_bad_lerobot_input_by_name_writing_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, case: str,
        message: str) -> None:
    """Each refusal comes before lerobot is imported (it is blocked here) and before --out is created."""
    from robolora import cli

    monkeypatch.setitem(sys.modules, "lerobot", None)
    info = json.loads((FIXTURES / "dataset_info.json").read_text())
    features = info["features"]
    config, flags = fixture_config(), []
    if case == "unsupported type":
        config["type"] = "diffusion"
    elif case == "misshapen image":
        features["observation.images.front"]["shape"] = [16, 16, 3]
    elif case == "missing state":
        del features["observation.state"]
    elif case == "v2.1 dataset":
        info["codebase_version"] = "v2.1"
    elif case == "full fine-tuning":
        flags = ["--method", "full"]
    elif case == "no env to roll out":
        flags = ["--skill", "stack_cups", "--eval-episodes", "5"]
    elif case == "no demos":
        flags = ["--demos", "0"]
    elif case == "bad execution":
        flags = ["--n-action-steps", "9"]
    act, data = lerobot_folders(tmp_path, config, info)
    if case == "robolora demos":
        data = tmp_path / "demos"
        data.mkdir()
    base = [] if case == "robolora base" else ["--base", str(act)]  # the default: robolora's shipped base
    out = tmp_path / "out"
    assert cli.main(["train-skill", *base, "--data", str(data), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("robolora train-skill: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not out.exists()


def test_a_query_skips_lerobots_eval_walk_only_when_already_in_eval_mode(policy: LeRobotPolicy) -> None:
    """LeRobot's predict_action_chunk calls self.eval() per query (a walk over every submodule, skills included):
    skipped in eval mode, the same actions either way, nothing left behind; in training mode it still runs."""
    walks = []
    original = nn.Module.eval
    probe = policy.spec.probe(2)
    try:
        nn.Module.eval = lambda self: walks.append(type(self).__name__) or original(self)  # type: ignore[method-assign]
        policy.predict_chunk(probe)  # LeRobot's object starts in training mode (outside our tree): its own eval()
        walks.clear()
        quiet = policy.predict_chunk(probe)
        assert walks == [] and "eval" not in policy.lerobot_policy.__dict__
        policy.train()
        walks.clear()
        loud = policy.predict_chunk(probe)
        assert walks == ["StandInACT"] and not policy.lerobot_policy.training  # LeRobot's own switch to eval mode
    finally:
        nn.Module.eval = original  # type: ignore[method-assign]
    assert torch.equal(quiet, loud)
