"""LoRA on nn.Conv2d: the kernel read as a C_out x (C_in·kh·kw) matrix. The LoRA path equals the merged kernel,
merge/unmerge restore W0 bit for bit, a conv skill switches in every SkillManager mode, strips to a plain Conv2d,
exports with parity and crosses to PEFT's Conv2d LoRA and back with the same outputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robolora.adapters import adapter_from_policy, attach, from_peft, to_peft
from robolora.config import LoRAConfig
from robolora.export import export_bundle
from robolora.inject import inject_lora, lora_layers, set_active_adapter, strip_lora, target_shapes
from robolora.lora import LoRAConv2d
from robolora.skills import MODES, SkillManager
from test_adapters import tiny

CONVS = ("stems.front.convs.2", "stems.front.convs.4")  # 3x3, stride 2, padding 1 in the tiny visuomotor policy


def random_conv(**kwargs) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(6, 10, kernel_size=3, **kwargs)


def with_random_b(layer: LoRAConv2d, name: str, seed: int = 1) -> None:
    with torch.no_grad():
        layer.lora_B[name].normal_(0.0, 0.1, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kwargs", [{}, {"stride": 2, "padding": 1}, {"padding": 2, "dilation": 2, "bias": False}])
def test_the_lora_path_is_the_merged_kernel_and_unmerge_is_bit_exact(kwargs) -> None:
    conv = random_conv(**kwargs)
    w0 = conv.weight.detach().clone()
    layer = LoRAConv2d(conv)
    layer.add_adapter("s", LoRAConfig(rank=3, alpha=6.0), generator=torch.Generator().manual_seed(0))
    assert layer.lora_A["s"].shape == (3, 6 * 9) and layer.lora_B["s"].shape == (10, 3)
    x = torch.randn(2, 6, 13, 11)
    plain = conv(x)
    layer.set_active("s")
    assert torch.equal(layer(x), plain)  # B = 0: a fresh adapter changes nothing
    with_random_b(layer, "s")
    unmerged = layer(x)
    kernel = w0 + 2.0 * (layer.lora_B["s"] @ layer.lora_A["s"]).detach().view_as(w0)
    expected = F.conv2d(x, kernel, conv.bias, conv.stride, conv.padding, conv.dilation)
    assert (unmerged - plain).abs().max() > 1e-3
    torch.testing.assert_close(unmerged, expected, atol=1e-5, rtol=1e-5)
    layer.merge("s")
    torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)  # merged: the LoRA path is skipped
    layer.unmerge()
    assert torch.equal(conv.weight, w0)


def test_grouped_and_circular_convolutions_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"grouped nn.Conv2d \(groups=2\) is not supported"):
        LoRAConv2d(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"padding_mode='circular' is not supported"):
        LoRAConv2d(nn.Conv2d(4, 4, 3, padding_mode="circular"))
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Linear(4, 4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="grouped"):
        inject_lora(model, LoRAConfig(rank=2, targets=("0", "1")), "s")
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[1], nn.Linear)  # nothing wrapped
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def conv_skill(seed: int = 1):
    """A skill with random B on two convolutions and the attention of the tiny policy, as training leaves it."""
    policy = tiny()
    targets = (*CONVS, "attn.q", "attn.v")
    names = inject_lora(policy, LoRAConfig(rank=4, alpha=8.0, targets=targets), "look",
                        generator=torch.Generator().manual_seed(seed))
    assert set(CONVS) <= set(names)
    for layer in lora_layers(policy).values():
        with_random_b(layer, "look", seed)
    set_active_adapter(policy, "look")
    return policy, adapter_from_policy(policy, "look")


def test_target_shapes_read_a_kernel_as_a_matrix() -> None:
    shapes = target_shapes(tiny())
    convs = {n: m for n, m in tiny().named_modules() if isinstance(m, nn.Conv2d)}
    for name in CONVS:
        out_channels, in_channels, kh, kw = convs[name].weight.shape
        assert shapes[name] == (out_channels, in_channels * kh * kw)


@pytest.mark.parametrize("mode", MODES)
def test_a_conv_skill_switches_in_every_mode_and_the_base_comes_back_bit_identical(mode: str) -> None:
    trained, adapter = conv_skill()
    probe = tiny().spec.probe(3)
    with torch.no_grad():
        expected = trained.predict_chunk(probe)
        base = tiny()
        plain = base.predict_chunk(probe)
        before = {k: v.clone() for k, v in base.state_dict().items()}
        manager = SkillManager(base, mode=mode)
        assert manager.attach("look", adapter).live
        manager.activate("look")
        torch.testing.assert_close(manager.predict_chunk(probe), expected, atol=1e-5, rtol=1e-5)
        manager.activate(None)
        assert torch.equal(manager.predict_chunk(probe), plain)
        manager.close()
    after = base.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not lora_layers(base)


def test_a_conv_skill_strips_to_plain_convolutions_and_exports_with_parity(tmp_path) -> None:
    trained, adapter = conv_skill()
    probe = tiny().spec.probe(2)
    with torch.no_grad():
        expected = trained.predict_chunk(probe)
        strip_lora(trained, merge="look")
        assert all(type(trained.get_submodule(n)) is nn.Conv2d for n in CONVS)
        torch.testing.assert_close(trained.predict_chunk(probe), expected, atol=1e-5, rtol=1e-5)
    report = export_bundle(tiny(), adapter, tmp_path / "bundle")
    assert report["parity"]["max_abs_diff"] <= report["parity"]["tolerance"]


def test_a_conv_skill_crosses_to_peft_and_back(tmp_path) -> None:
    import peft
    from safetensors.torch import load_file

    trained, adapter = conv_skill()
    probe = tiny().spec.probe(2)
    with torch.no_grad():
        expected = trained.predict_chunk(probe)
    folder = tmp_path / "peft"
    to_peft(adapter, folder, policy=tiny())
    tensors = load_file(f"{folder}/adapter_model.safetensors")
    a = tensors[f"base_model.model.{CONVS[0]}.lora_A.weight"]
    b = tensors[f"base_model.model.{CONVS[0]}.lora_B.weight"]
    out_channels, in_channels, kh, kw = tiny().get_submodule(CONVS[0]).weight.shape
    assert a.shape == (4, in_channels, kh, kw) and b.shape == (out_channels, 4, 1, 1)  # PEFT's Conv2d layout
    model = peft.PeftModel.from_pretrained(tiny(), folder).eval()
    assert isinstance(model.base_model.model.get_submodule(CONVS[0]), peft.tuners.lora.Conv2d)
    with torch.no_grad():
        theirs = model.base_model.model.predict_chunk(probe)
    back = from_peft(folder, skill="look")
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=1e-5)
    for layer in CONVS:
        assert torch.equal(back.lora[layer][0], adapter.lora[layer][0].float())
        assert torch.equal(back.lora[layer][1], adapter.lora[layer][1].float())
    policy = tiny()
    attach(policy, back)
    set_active_adapter(policy, "look")
    with torch.no_grad():
        torch.testing.assert_close(policy.predict_chunk(probe), expected, atol=1e-5, rtol=1e-5)
