"""Adapter files: exact round trips, fingerprint checks, every kind of bad file refused with the policy untouched,
and interchange with PEFT itself."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from robolora.adapters import (SkillAdapter, adapter_from_policy, attach, attach_for_eval, detach, from_peft,
                               load_adapter, save_adapter, to_peft)
from robolora.config import LoRAConfig
from robolora.policy import probe_batch
from robolora.inject import inject_lora, lora_layers, set_active_adapter
from robolora.policies import PolicyConfig, VisuomotorPolicy, base_fingerprint


def tiny(seed: int = 0) -> VisuomotorPolicy:
    torch.manual_seed(seed)
    return VisuomotorPolicy(PolicyConfig.preset("tiny")).eval()


def trained_adapter(seed: int = 1, rank: int = 4, targets=("attn.q", "attn.k", "attn.v", "attn.o")) -> SkillAdapter:
    """An adapter as training leaves it: non-zero B and a skill token, recorded against tiny(0)."""
    policy = tiny()
    g = torch.Generator().manual_seed(seed)
    inject_lora(policy, LoRAConfig(rank=rank, alpha=2.0 * rank, targets=targets), "wipe", generator=g)
    with torch.no_grad():
        for layer in lora_layers(policy).values():
            layer.lora_B["wipe"].normal_(0, 0.1, generator=g)
    policy.set_skill_token(torch.nn.Parameter(torch.randn(policy.config.d_model, generator=g)))
    adapter = adapter_from_policy(policy, "wipe", metadata={"metrics": {"eval/success_rate": 0.9}})
    return adapter


def outputs(policy: VisuomotorPolicy) -> torch.Tensor:
    with torch.no_grad():
        return policy.predict_chunk(probe_batch(policy, batch_size=3))


def test_save_load_round_trip_is_bit_exact(tmp_path):
    adapter = trained_adapter()
    save_adapter(adapter, tmp_path / "wipe")
    loaded = load_adapter(tmp_path / "wipe")
    assert loaded.skill == "wipe" and loaded.config == adapter.config
    assert loaded.base_fingerprint == adapter.base_fingerprint
    assert loaded.metadata["metrics"] == {"eval/success_rate": 0.9}
    for key, value in adapter.tensors().items():
        assert torch.equal(loaded.tensors()[key], value), key
    meta = json.loads((tmp_path / "wipe" / "adapter.json").read_text())
    assert meta["lora"]["rank"] == 4 and meta["skill_token"] and len(meta["layers"]) == 8


def test_attached_adapter_reproduces_the_trained_outputs(tmp_path):
    adapter = trained_adapter()
    save_adapter(adapter, tmp_path / "wipe")
    policy = tiny()
    base_out = outputs(policy)
    attach_for_eval(policy, tmp_path / "wipe")
    skill_out = outputs(policy)
    assert (skill_out - base_out).abs().max() > 1e-3
    reference = tiny()  # the policy the adapter was made on, with the weights set directly
    inject_lora(reference, LoRAConfig(rank=4, alpha=8.0), "wipe")
    with torch.no_grad():
        for name, layer in lora_layers(reference).items():
            layer.lora_A["wipe"].copy_(adapter.lora[name][0])
            layer.lora_B["wipe"].copy_(adapter.lora[name][1])
    set_active_adapter(reference, "wipe")
    reference.set_skill_token(torch.nn.Parameter(adapter.skill_token.clone()))
    assert torch.equal(outputs(reference), skill_out)


def test_adapter_execution_is_saved_and_applied_on_attach_for_eval(tmp_path):
    adapter = trained_adapter()
    adapter.metadata["execution"] = {"n_action_steps": 8}
    save_adapter(adapter, tmp_path / "wipe")
    assert load_adapter(tmp_path / "wipe").metadata["execution"] == {"n_action_steps": 8}
    policy = tiny()
    assert policy.config.n_action_steps == 4
    attach_for_eval(policy, tmp_path / "wipe")
    assert policy.config.n_action_steps == 8


@pytest.mark.parametrize("execution, match", [({"n_action_steps": 0}, "n_action_steps"),
                                              ({"horizon": 8}, "unknown field"),
                                              ({"n_action_steps": 4, "temporal_ensemble": 0.1}, "n_action_steps=1")])
def test_bad_execution_is_refused_before_anything_changes(tmp_path, execution, match):
    adapter = trained_adapter()
    adapter.metadata["execution"] = execution
    save_adapter(adapter, tmp_path / "wipe")
    policy = tiny()
    before = outputs(policy)
    with pytest.raises(ValueError, match=match):
        attach_for_eval(policy, tmp_path / "wipe")
    assert torch.equal(outputs(policy), before) and not lora_layers(policy)
    assert policy.config.n_action_steps == 4


def test_attach_active_reads_the_protocol_not_a_config():
    """attach_active works on any protocol policy: a policy with no ``config`` and no ``set_execution`` takes an
    adapter that keeps its execution, and refuses one that brings its own, with nothing changed."""
    from test_lora_mha import AttentionNet, frozen, trained_adapter as attention_adapter

    from robolora.adapters import attach_active

    assert not hasattr(AttentionNet, "config") and not hasattr(AttentionNet, "set_execution")
    net = frozen()
    attention_adapter(net, "s", seed=3)
    set_active_adapter(net, "s")
    adapter = adapter_from_policy(net, "s")
    policy, probe = frozen(), {"state": torch.randn(2, 5, 4)}
    with torch.no_grad():
        before = policy.predict_chunk(probe)
    adapter.metadata["execution"] = {"n_action_steps": 2}
    with pytest.raises(TypeError, match="no set_execution"):
        attach_active(policy, adapter)
    adapter.metadata["execution"] = {"n_action_steps": 6}  # chunk_size 5
    with pytest.raises(ValueError, match=r"n_action_steps=6 must be in \[1, chunk_size=5\]"):
        attach_active(policy, adapter)
    assert not lora_layers(policy)
    with torch.no_grad():
        assert torch.equal(policy.predict_chunk(probe), before)
    del adapter.metadata["execution"]
    assert attach_active(policy, adapter) == "s"
    with torch.no_grad():
        assert torch.allclose(policy.predict_chunk(probe), net.predict_chunk(probe), atol=1e-6)


def test_detach_restores_the_base_exactly():
    policy = tiny()
    before, fingerprint = outputs(policy), base_fingerprint(policy)
    attach(policy, trained_adapter())
    set_active_adapter(policy, "wipe")
    set_active_adapter(policy, None)
    detach(policy, "wipe")
    assert torch.equal(outputs(policy), before)
    assert base_fingerprint(policy) == fingerprint


def _refused(policy: VisuomotorPolicy, path, match: str) -> None:
    before = outputs(policy)
    state = {k: v.clone() for k, v in policy.state_dict().items()}
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        attach(policy, load_adapter(path))
    assert torch.equal(outputs(policy), before), "a refused load must leave the policy's outputs bit-identical"
    assert not lora_layers(policy) and state.keys() == policy.state_dict().keys()


def test_adapter_for_another_base_is_refused_with_both_fingerprints(tmp_path):
    adapter = trained_adapter()
    save_adapter(adapter, tmp_path / "wipe")
    other = tiny(seed=7)
    with pytest.raises(ValueError) as error:
        attach(other, load_adapter(tmp_path / "wipe"))
    assert adapter.base_fingerprint in str(error.value) and base_fingerprint(other) in str(error.value)
    _refused(other, tmp_path / "wipe", "trained on base")


def test_truncated_file_is_refused(tmp_path):
    save_adapter(trained_adapter(), tmp_path / "a")
    weights = tmp_path / "a" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _refused(tiny(), tmp_path / "a", "truncated or corrupt")


def test_corrupt_json_is_refused(tmp_path):
    save_adapter(trained_adapter(), tmp_path / "a")
    (tmp_path / "a" / "adapter.json").write_text("{not json")
    _refused(tiny(), tmp_path / "a", "not valid JSON")


def test_missing_file_is_refused(tmp_path):
    save_adapter(trained_adapter(), tmp_path / "a")
    (tmp_path / "a" / "adapter.safetensors").unlink()
    _refused(tiny(), tmp_path / "a", "missing")


def _rewrite(path, edit) -> None:
    tensors = load_file(str(path / "adapter.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "adapter.safetensors"))


def test_missing_tensor_is_refused(tmp_path):
    save_adapter(trained_adapter(), tmp_path / "a")
    _rewrite(tmp_path / "a", lambda t: t.pop("blocks.0.attn.q.lora_B"))
    _refused(tiny(), tmp_path / "a", r"missing tensors \['blocks.0.attn.q.lora_B'\]")


def test_wrong_shapes_are_refused(tmp_path):
    save_adapter(trained_adapter(), tmp_path / "a")
    _rewrite(tmp_path / "a", lambda t: t.update({"blocks.1.attn.v.lora_A": torch.zeros(4, 7)}))
    _refused(tiny(), tmp_path / "a", "wrong base architecture")
    _rewrite(tmp_path / "a", lambda t: t.update({"blocks.1.attn.v.lora_A": torch.zeros(3, 32)}))
    _refused(tiny(), tmp_path / "a", "expected")


def test_nan_weights_are_refused(tmp_path):
    save_adapter(trained_adapter(), tmp_path / "a")

    def poison(t):
        t["blocks.0.attn.o.lora_B"][0, 0] = float("nan")

    _rewrite(tmp_path / "a", poison)
    _refused(tiny(), tmp_path / "a", "NaN or Inf")


def test_peft_layout_round_trip(tmp_path):
    adapter = trained_adapter()
    to_peft(adapter, tmp_path / "peft")
    keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).keys()
    assert "base_model.model.blocks.0.attn.q.lora_A.weight" in keys
    back = from_peft(tmp_path / "peft")
    assert back.skill == "wipe" and back.config.rank == adapter.config.rank
    assert back.config.alpha == adapter.config.alpha and back.base_fingerprint == adapter.base_fingerprint
    for key, value in adapter.tensors().items():
        assert torch.equal(back.tensors()[key], value), key
    assert load_adapter(tmp_path / "peft").skill == "wipe", "load_adapter reads PEFT folders too"


def test_peft_loads_our_adapter_with_identical_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    adapter = trained_adapter()
    to_peft(adapter, tmp_path / "peft")
    ours = tiny()
    attach(ours, adapter)
    set_active_adapter(ours, "wipe")
    theirs = peft.PeftModel.from_pretrained(tiny(), str(tmp_path / "peft")).eval()
    model = theirs.base_model.model
    assert torch.allclose(outputs(model), outputs(ours), atol=1e-6, rtol=0)


def test_adapter_made_by_peft_converts_with_identical_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "fc1"], init_lora_weights=False)
    theirs = peft.get_peft_model(tiny(), config).eval()  # init_lora_weights=False: B is non-zero
    theirs.save_pretrained(str(tmp_path / "from_peft"))
    adapter = from_peft(tmp_path / "from_peft", skill="peft_skill")
    assert adapter.config.rank == 4 and len(adapter.lora) == 2 * 3
    ours = tiny()
    attach(ours, adapter)
    set_active_adapter(ours, "peft_skill")
    assert torch.allclose(outputs(theirs.base_model.model), outputs(ours), atol=1e-6, rtol=0)


@pytest.mark.parametrize("text", ["null", "[1, 2]", "3", '"wipe"'])
def test_adapter_json_that_is_not_an_object_is_refused(tmp_path, text):
    save_adapter(trained_adapter(), tmp_path / "a")
    (tmp_path / "a" / "adapter.json").write_text(text)
    _refused(tiny(), tmp_path / "a", "adapter.json must hold a JSON object")


@pytest.mark.parametrize("name", ["adapter_config.json", "robolora_skill.json"])
def test_peft_json_that_is_not_an_object_is_refused(tmp_path, name):
    to_peft(trained_adapter(), tmp_path / "peft")
    (tmp_path / "peft" / name).write_text("[]")
    with pytest.raises(ValueError, match=f"{name} must hold a JSON object"):
        from_peft(tmp_path / "peft")


def test_peft_config_without_rank_is_refused_by_name(tmp_path):
    to_peft(trained_adapter(), tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    del config["r"]
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="adapter_config.json lacks or has an invalid field"):
        from_peft(tmp_path / "peft")


@pytest.mark.parametrize("fingerprint", [12345, 1.5, ["abc"], {"sha": "abc"}, True])
def test_non_string_base_fingerprint_is_refused_on_load(tmp_path, fingerprint):
    save_adapter(trained_adapter(), tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    meta["base_fingerprint"] = fingerprint
    (tmp_path / "a" / "adapter.json").write_text(json.dumps(meta))
    _refused(tiny(), tmp_path / "a", "base_fingerprint must be a string")


def test_attach_with_a_non_string_fingerprint_is_refused_cleanly():
    adapter = trained_adapter()
    adapter.base_fingerprint = 12345  # built in code, not loaded: attach must still say what is wrong
    policy = tiny()
    before = outputs(policy)
    with pytest.raises(ValueError, match="was trained on base 12345"):
        attach(policy, adapter)
    assert torch.equal(outputs(policy), before) and not lora_layers(policy)


def test_load_adapter_finds_a_shipped_skill_by_name_from_any_folder(tmp_path, monkeypatch):
    from robolora.rollout import shipped_skills_dir

    if not (shipped_skills_dir() / "wipe" / "adapter.json").exists():
        pytest.skip("no shipped skill adapters in this installation")
    monkeypatch.chdir(tmp_path)
    assert load_adapter("wipe").skill == "wipe"
    with pytest.raises(FileNotFoundError, match=r"shipped: \[.*'dish_rack'.*'wipe'\]"):
        load_adapter("pour")
    save_adapter(trained_adapter(seed=5), tmp_path / "wipe")  # an existing folder wins over the shipped name
    assert torch.equal(load_adapter("wipe").skill_token, trained_adapter(seed=5).skill_token)
