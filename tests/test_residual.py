"""A skill's residual action head (robolora.residual) carried by its adapter: saved and loaded with it (refused
whole when entry and file disagree), installed through the policy's set_action_residual hook when the skill is made
active (refused before anything changes on a policy that cannot run it), removed on detach/deactivate, counted in
the skill's budget, exported inside the graph (ONNX, pt2, reloaded bundle, multi-skill bundles, the torch-free
controller) and shown by ``robolora info``. Tiny policies throughout."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from robolora.adapters import (attach, attach_active, attach_for_eval, check_skill_budget, deactivate, detach,
                               load_adapter, save_adapter)
from robolora.inject import lora_layers
from robolora.policies import ACTConfig, ACTPolicy
from robolora.policy import probe_batch
from robolora.residual import FILE, ResidualHead
from test_adapters import tiny, trained_adapter

BATCH = probe_batch(tiny(), batch_size=3, seed=7)


def residual_head(seed: int = 0, feature_dim: int = 32, chunk_size: int = 8, action_dim: int = 4) -> ResidualHead:
    """A trained-looking head: non-zero output layer (a fresh head is zero), corrections of about 0.1."""
    g = torch.Generator().manual_seed(seed)
    head = ResidualHead(feature_dim, chunk_size, action_dim)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return head.eval().requires_grad_(False)


def residual_adapter(seed: int = 0):
    return dataclasses.replace(trained_adapter(), residual=residual_head(seed))


def chunk(policy) -> torch.Tensor:
    with torch.no_grad():
        return policy.predict_chunk(BATCH)


def reference(adapter, head: ResidualHead | None) -> torch.Tensor:
    """The plain policy with the skill's LoRA and token active and ``head`` installed by hand."""
    policy = tiny()
    attach_active(policy, dataclasses.replace(adapter, residual=None))
    policy.set_action_residual(head)
    return chunk(policy)


# ------------------------------------------------------------------------------------------- adapter files


def test_save_load_round_trip_is_bit_exact(tmp_path):
    adapter = residual_adapter()
    save_adapter(adapter, tmp_path / "wipe")
    meta = json.loads((tmp_path / "wipe" / "adapter.json").read_text())
    assert meta["residual"] == {"feature_dim": 32, "chunk_size": 8, "action_dim": 4, "hidden": 8, "parameters": 808}
    assert meta["parameters"] == adapter.num_parameters  # the LoRA weights and token, as before
    loaded = load_adapter(tmp_path / "wipe")
    assert loaded.residual is not None and "residual" not in loaded.metadata
    for key, value in adapter.residual.tensors().items():
        assert torch.equal(loaded.residual.tensors()[key], value), key
    assert loaded.residual_parameters == 808
    assert loaded.skill_parameters == loaded.num_parameters + 808
    plain = trained_adapter()
    save_adapter(plain, tmp_path / "plain")  # no head: no file, no entry
    assert not (tmp_path / "plain" / FILE).exists() and load_adapter(tmp_path / "plain").residual is None


def test_entry_without_file_and_file_without_entry_are_refused(tmp_path):
    save_adapter(residual_adapter(), tmp_path / "a")
    (tmp_path / "a" / FILE).unlink()
    with pytest.raises(ValueError, match=r"holds a \"residual\" entry in adapter.json but not residual.safetensors"):
        load_adapter(tmp_path / "a")
    save_adapter(residual_adapter(), tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "adapter.json").read_text())
    del meta["residual"]
    (tmp_path / "b" / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"holds residual.safetensors but not a \"residual\" entry"):
        load_adapter(tmp_path / "b")


def test_wrong_shapes_and_nan_in_the_residual_file_are_refused(tmp_path):
    save_adapter(residual_adapter(), tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    meta["residual"]["hidden"] = 16
    (tmp_path / "a" / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not belong together"):
        load_adapter(tmp_path / "a")
    save_adapter(residual_adapter(), tmp_path / "b")
    tensors = load_file(str(tmp_path / "b" / FILE))
    tensors["fc2.bias"][0] = float("nan")
    save_file(tensors, str(tmp_path / "b" / FILE))
    with pytest.raises(ValueError, match="non-finite"):
        load_adapter(tmp_path / "b")


# ------------------------------------------------------------------------------------------- attach


def test_attach_for_eval_installs_the_head_and_matches_the_hand_installed_one(tmp_path):
    adapter = residual_adapter()
    save_adapter(adapter, tmp_path / "wipe")
    policy = tiny()
    attach_for_eval(policy, tmp_path / "wipe")
    out = chunk(policy)
    assert torch.equal(out, reference(adapter, adapter.residual))
    assert (out - reference(adapter, None)).abs().max() > 1e-2, "the head must change the actions"
    plain = tiny()
    attach_active(plain, trained_adapter())
    assert list(policy.state_dict()) == list(plain.state_dict()), "the head stays outside the policy's state dict"


def test_detach_deactivate_and_a_skill_without_a_head_remove_it():
    adapter = residual_adapter()
    without = reference(adapter, None)
    policy = tiny()
    attach_active(policy, adapter)
    deactivate(policy)
    assert torch.equal(chunk(policy), chunk(tiny())), "deactivate: the plain base, no token, no head"
    detach(policy, "wipe")
    attach_active(policy, adapter)
    detach(policy, "wipe")
    policy.set_skill_token(None)
    assert torch.equal(chunk(policy), chunk(tiny())), "detach removes the skill's head"
    attach_active(policy, adapter)
    attach_active(policy, dataclasses.replace(adapter, skill="other", residual=None))
    assert torch.equal(chunk(policy), without), "activating a skill without a head removes the previous one"
    detach(policy, "wipe")  # not the installed skill's: nothing to remove
    assert torch.equal(chunk(policy), without)


def test_attach_copies_the_head_and_never_moves_the_adapters():
    adapter = residual_adapter()
    policy = tiny()
    attach_active(policy, adapter)
    with torch.no_grad():
        adapter.residual.fc2.bias.add_(1.0)  # the adapter's head changes later: the installed copy does not
    assert torch.equal(chunk(policy), reference(adapter, residual_head(0)))


class NoHook(type(tiny())):
    set_action_residual = None  # a protocol policy without the residual-action hook


@pytest.mark.parametrize("bad", ["no hook", "wrong chunk", "wrong features", "nan"])
def test_a_head_the_policy_cannot_run_is_refused_before_anything_changes(bad):
    adapter = residual_adapter()
    policy = tiny()
    if bad == "no hook":
        policy.__class__ = NoHook
    else:
        head = {"wrong chunk": lambda: residual_head(chunk_size=4), "wrong features": lambda: residual_head(
            feature_dim=16), "nan": lambda: residual_head()}[bad]()
        if bad == "nan":
            with torch.no_grad():
                head.fc2.weight[0, 0] = float("inf")
        adapter = dataclasses.replace(adapter, residual=head)
    before, keys = chunk(policy), list(policy.state_dict())
    error, match = {"no hook": (TypeError, "has no residual-action hook"),
                    "wrong chunk": (ValueError, r"expects \(features, chunk, action\) = \(32, 4, 4\) but this "
                                                r"VisuomotorPolicy has \(32, 8, 4\)"),
                    "wrong features": (ValueError, r"= \(16, 8, 4\)"), "nan": (ValueError, "NaN or Inf")}[bad]
    for call in (attach_active, attach):
        with pytest.raises(error, match=match):
            call(policy, adapter)
        assert torch.equal(chunk(policy), before) and list(policy.state_dict()) == keys
        assert not lora_layers(policy) and policy.skill_token is None


def test_act_policy_runs_a_residual_skill():
    policy = ACTPolicy(ACTConfig.preset("tiny")).eval()
    spec = policy.spec
    head = residual_head(3, spec.feature_dim, spec.chunk_size, spec.action_dim)
    batch = probe_batch(policy, batch_size=2, seed=1)
    with torch.no_grad():
        plain = policy.predict_chunk(batch)
        policy.set_action_residual(head)
        assert (policy.predict_chunk(batch) - plain).abs().max() > 1e-2
        policy.set_action_residual(None)
        assert torch.equal(policy.predict_chunk(batch), plain)


# ------------------------------------------------------------------------------------------- budget


def test_the_residual_counts_against_the_skill_budget(monkeypatch):
    adapter = residual_adapter()
    counts = check_skill_budget(adapter, 150_000)
    assert counts["residual_parameters"] == 808 and counts["total_parameters"] == adapter.num_parameters + 808
    with pytest.raises(ValueError, match=r"residual head 808.*over the 2% budget"):
        check_skill_budget(adapter, 42_228)  # the tiny base: 844 of room for 2,888
    import robolora.completion as completion

    seen = []

    def fake_check(adapter_parameters, head, base_parameters):
        seen.append(adapter_parameters)
        raise RuntimeError("stop")

    monkeypatch.setattr(completion, "check_budget", fake_check)
    with pytest.raises(RuntimeError, match="stop"):
        completion.train_completion(tiny(), adapter, [])
    assert seen == [adapter.num_parameters + 808], "train-completion's budget counts the residual head"


# ------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """One residual skill ("resid": no env bounds, so probe observations are never faults) exported alone and with
    a head-less skill, and the same skill without its head."""
    from robolora.export import export_bundle, export_skills

    root = tmp_path_factory.mktemp("residual_bundles")
    adapter = dataclasses.replace(residual_adapter(), skill="resid")
    save_adapter(adapter, root / "adapter")
    plain = dataclasses.replace(adapter, residual=None, skill="plain")
    return root, adapter, export_bundle(tiny(), root / "adapter", root / "resid"), \
        export_bundle(tiny(), plain, root / "plain"), export_skills(tiny(), [root / "adapter", plain], root / "multi")


def torch_skill(adapter):
    policy = tiny()
    attach_active(policy, adapter)
    return policy


def test_export_puts_the_head_in_the_graph_with_the_same_parity_report(bundles):
    from robolora.export import PARITY_TOLERANCE, load_merged_policy, probe_inputs

    root, adapter, meta, plain, _ = bundles
    assert meta["residual"] == {**adapter.residual.to_dict(), "file": FILE}
    assert (root / "resid" / FILE).is_file() and FILE in meta["files"]
    assert set(meta["parity"]) == set(plain["parity"]), "the parity report keeps its form"
    assert meta["parity"]["max_abs_diff"] <= PARITY_TOLERANCE and "residual" not in plain
    probe = probe_inputs(tiny(), 4, seed=321)
    inputs = tuple(probe[k] for k in ("rgb_front", "proprio"))
    with torch.no_grad():
        expected = torch_skill(adapter).predict_chunk(probe)
        without = torch_skill(dataclasses.replace(adapter, residual=None)).predict_chunk(probe)
        program = torch.export.load(str(root / "resid" / "policy.pt2")).module()
        reloaded = load_merged_policy(root / "resid").predict_chunk(probe)
        assert (program(*inputs) - expected).abs().max() <= PARITY_TOLERANCE
    assert (reloaded - expected).abs().max() <= PARITY_TOLERANCE, "load_merged_policy installs the head again"
    assert (expected - without).abs().max() > 1e-2


def test_the_controller_runs_the_head_as_the_torch_policy_does(bundles):
    from robolora.controller import load_bundle
    from robolora.export import PARITY_TOLERANCE, probe_inputs

    root, adapter, *_ = bundles
    policy, controller = torch_skill(adapter), load_bundle(root / "resid")
    for tick in range(6):  # two chunks' worth of executed actions, new observations every tick
        obs = {k: v.numpy() for k, v in probe_inputs(policy, 3, seed=tick).items()}
        with torch.no_grad():
            expected = policy.select_action(obs)
        got = controller.select_action(obs)
        assert controller.fault_count == 0 and np.abs(got - expected).max() <= PARITY_TOLERANCE, tick


def test_a_torch_free_controller_runs_the_residual_bundle(bundles, tmp_path):
    from robolora.export import PARITY_TOLERANCE, probe_inputs
    from test_controller import run_without_torch

    root, adapter, *_ = bundles
    probe = {k: v.numpy() for k, v in probe_inputs(tiny(), 2, seed=5).items()}
    np.savez(tmp_path / "obs.npz", **probe)
    with torch.no_grad():
        expected = torch_skill(adapter).predict_chunk({k: torch.from_numpy(v) for k, v in probe.items()}).numpy()
    result = run_without_torch(f"""
        import numpy as np
        from robolora.controller import load_bundle
        obs = dict(np.load({str(tmp_path / "obs.npz")!r}))
        result = {{"chunk": load_bundle({str(root / "resid")!r}).predict_chunk(obs).tolist()}}
        assert "torch" not in sys.modules
    """)
    assert np.abs(np.asarray(result["chunk"]) - expected).max() <= PARITY_TOLERANCE


def test_multi_skill_bundles_carry_each_skills_head(bundles):
    from robolora.controller import load_bundle
    from robolora.export import PARITY_TOLERANCE, load_merged_policy, probe_inputs

    root, adapter, *_, index = bundles
    assert f"skills/resid/{FILE}" in index["files"] and f"skills/plain/{FILE}" not in index["files"]
    probe = probe_inputs(tiny(), 2, seed=9)
    feeds = {k: v.numpy() for k, v in probe.items()}
    controller = load_bundle(root / "multi")
    for name, skill in (("resid", adapter), ("plain", dataclasses.replace(adapter, residual=None))):
        with torch.no_grad():
            expected = torch_skill(skill).predict_chunk(probe)
            reloaded = load_merged_policy(root / "multi" / "skills" / name).predict_chunk(probe)
        controller.activate(name)
        controller.select_action(feeds)  # the switch applies at a tick boundary
        assert (reloaded - expected).abs().max() <= PARITY_TOLERANCE, name
        assert np.abs(controller.predict_chunk(feeds) - expected.numpy()).max() <= PARITY_TOLERANCE, name


def test_a_bundle_missing_or_with_a_changed_head_file_is_refused(bundles, tmp_path):
    import shutil

    from robolora.export import load_merged_policy

    root, *_ = bundles
    shutil.copytree(root / "resid", tmp_path / "b")
    tensors = load_file(str(tmp_path / "b" / FILE))
    tensors["fc2.bias"] += 1.0
    save_file(tensors, str(tmp_path / "b" / FILE))
    with pytest.raises(ValueError, match="does not match its sha256 in policy.json"):
        load_merged_policy(tmp_path / "b")
    (tmp_path / "b" / FILE).unlink()
    with pytest.raises(FileNotFoundError, match="records a residual head but residual.safetensors is missing"):
        load_merged_policy(tmp_path / "b")


# ------------------------------------------------------------------------------------------- robolora info


def test_info_shows_the_residual_head(tmp_path, capsys, bundles):
    from robolora.cli import main

    adapter = residual_adapter()
    save_adapter(adapter, tmp_path / "wipe")
    assert main(["info", str(tmp_path / "wipe")]) == 0
    out = capsys.readouterr().out
    assert "residual head      808 parameters (hidden 8 on 32 features + the 8x4 chunk" in out
    assert f"skill total        {adapter.num_parameters + 808:,} parameters" in out
    assert main(["info", str(bundles[0] / "resid")]) == 0
    assert "residual head      808 parameters, inside the graph" in capsys.readouterr().out
    save_adapter(trained_adapter(), tmp_path / "plain")
    assert main(["info", str(tmp_path / "plain")]) == 0
    assert "residual head" not in capsys.readouterr().out
