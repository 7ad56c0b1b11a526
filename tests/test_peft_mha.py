"""PEFT interchange for LoRA on nn.MultiheadAttention (robolora.adapters.to_peft / from_peft): PEFT loads our q/k/v/
out_proj adapters in its own attention layout with the same outputs, they read back bit-exactly, attention adapters
trained by PEFT convert, and attention PEFT cannot hold (kdim != embed_dim) is refused with nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from robolora import LoRAConfig, inject_lora, lora_layers, merge_adapter, set_active_adapter
from robolora.adapters import (SkillAdapter, adapter_from_policy, attach, from_peft, peft_out_proj_applications,
                               to_peft)

peft = pytest.importorskip("peft")

D, HEADS, KDIM = 16, 2, 8
ALL = ("attn.q", "attn.k", "attn.v", "attn.out_proj", "head")
TOLERANCE = 1e-5  # merged vs unmerged LoRA, and PEFT's merge-per-call vs ours


class AttentionNet(nn.Module):
    """A plain module: one batch-first nn.MultiheadAttention (self-attention, or cross-attention with kdim) and a
    Linear head."""

    def __init__(self, kdim: int | None = None) -> None:
        super().__init__()
        self.memory = nn.Linear(D, kdim or D)
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mem = self.memory(x)  # (B, T, kdim)
        y, _ = self.attn(x, mem, mem, need_weights=False)  # (B, T, D)
        return self.head(y)  # (B, T, 3)


def plain(kdim: int | None = None) -> AttentionNet:
    torch.manual_seed(0)
    return AttentionNet(kdim).requires_grad_(False).eval()


def inputs() -> torch.Tensor:
    return torch.randn(3, 5, D, generator=torch.Generator().manual_seed(1))


def trained_adapter(targets=ALL, rslora: bool = False, kdim: int | None = None) -> SkillAdapter:
    """An adapter as training leaves it (non-zero B), with a scaling 5/3 that no float holds exactly."""
    net = plain(kdim)
    g = torch.Generator().manual_seed(2)
    inject_lora(net, LoRAConfig(rank=3, alpha=5.0, targets=targets, rslora=rslora), "wipe", generator=g)
    with torch.no_grad():
        for layer in lora_layers(net).values():
            if "wipe" in layer.adapters:
                layer.lora_B["wipe"].normal_(0, 0.1, generator=g)
    return adapter_from_policy(net, "wipe")


def ours(adapter: SkillAdapter, merged: bool) -> torch.Tensor:
    net = plain()
    attach(net, adapter, "wipe")
    merge_adapter(net, "wipe") if merged else set_active_adapter(net, "wipe")
    with torch.no_grad():
        return net(inputs())


def theirs(folder) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(plain(), str(folder)).eval()
    with torch.no_grad():
        return model(inputs())


@pytest.mark.parametrize("targets, rslora", [(ALL, False), (ALL, True), (("attn.v", "head"), False),
                                             (("attn.out_proj",), False)])
def test_peft_loads_attention_adapters_with_our_outputs(tmp_path, targets, rslora):
    adapter = trained_adapter(targets, rslora)
    to_peft(adapter, tmp_path / "peft", policy=plain())
    keys = set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    attention = {f"base_model.model.attn{m}.lora_{ab}.weight" for m in ("", ".base_layer.out_proj") for ab in "AB"}
    assert attention <= keys, "PEFT's layout: the attention module's in_proj and its base_layer.out_proj"
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert "attn" in config["target_modules"] and not any(".q" in t for t in config["target_modules"])
    out = theirs(tmp_path / "peft")
    for merged in (False, True):
        assert (out - ours(adapter, merged)).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("targets", [ALL, ("attn.k", "attn.out_proj")])
def test_attention_round_trip_through_peft_is_bit_exact(tmp_path, targets):
    adapter = trained_adapter(targets)
    to_peft(adapter, tmp_path / "peft", policy=plain())
    back = from_peft(tmp_path / "peft")
    assert back.config.rank == adapter.config.rank and back.config.alpha == adapter.config.alpha
    assert set(back.lora) == set(adapter.lora)
    for key, value in adapter.tensors().items():
        assert torch.equal(back.tensors()[key], value), key
    assert (ours(back, merged=False) - ours(adapter, merged=False)).abs().max().item() == 0.0


def test_attention_adapter_trained_by_peft_converts_with_its_outputs(tmp_path):
    torch.manual_seed(3)  # init_lora_weights=False: B is non-zero and in_proj's A/B are dense, not block-diagonal
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["attn", "head"], init_lora_weights=False,
                             rank_pattern={"attn": 6}, alpha_pattern={"attn": 3})
    model = peft.get_peft_model(plain(), config).eval()
    model.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        expected = model(inputs())
    adapter = from_peft(tmp_path / "peft", skill="peft_skill")
    assert set(adapter.lora) == set(ALL) and adapter.config.rank == 6
    for merged in (False, True):
        assert (ours(adapter, merged) - expected).abs().max().item() <= TOLERANCE


def test_attention_with_other_kdim_is_refused_and_nothing_is_written(tmp_path):
    adapter = trained_adapter(("attn.q", "head"), kdim=KDIM)
    with pytest.raises(ValueError, match=r"'attn'.*kdim=8 and vdim=8 differ from embed_dim=16.*PEFT"):
        to_peft(adapter, tmp_path / "peft", policy=plain(KDIM))
    assert not (tmp_path / "peft").exists()


def test_out_proj_probe_measures_the_installed_peft_and_leaves_the_rng_alone():
    peft_out_proj_applications.cache_clear()
    state = torch.get_rng_state()
    assert peft_out_proj_applications() in (1, 2)
    assert torch.equal(torch.get_rng_state(), state)
