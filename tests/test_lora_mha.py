"""LoRA on nn.MultiheadAttention (robolora.lora_mha): q/k/v as row blocks of the packed in_proj_weight, or the
separate q/k/v_proj_weight when kdim/vdim differ, plus out_proj; in merge/unmerge and every SkillManager mode."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from robolora import LoRAConfig, inject_lora, lora_layers, merge_adapter, set_active_adapter, strip_lora, unmerge
from robolora.adapters import adapter_from_policy, attach
from robolora.lora_mha import LoRAMultiheadAttention
from robolora.policy import Execution, PolicySpec, TensorSpec
from robolora.skills import MODES, SkillManager

D, HEADS, KDIM = 16, 2, 8
TARGETS = ("attn.q", "attn.k", "attn.v", "attn.out_proj", "head")


class AttentionNet(nn.Module):
    """A tiny protocol policy around one nn.MultiheadAttention (self- or cross-attention with other kdim)."""

    def __init__(self, kdim: int | None = None) -> None:
        super().__init__()
        self.kdim = kdim
        self.embed = nn.Linear(4, D)
        self.memory = nn.Linear(4, kdim or D)
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(D, 3)

    @property
    def spec(self) -> PolicySpec:
        return PolicySpec({"state": TensorSpec((5, 4), "float32")}, TensorSpec((3,), "float32", -1, 1), chunk_size=5,
                          execution=Execution(n_action_steps=5))

    def predict_chunk(self, batch):
        x = self.embed(batch["state"])  # (B, 5, D)
        mem = self.memory(batch["state"])  # (B, 5, kdim)
        y, _ = self.attn(x, mem, mem, need_weights=False)  # (B, 5, D)
        return self.head(y)  # (B, 5, 3)

    def forward(self, batch):
        loss = self.predict_chunk(batch).square().mean()
        return loss, {"train/loss": float(loss.detach())}

    def reset(self, indices=None) -> None:
        pass


def frozen(kdim: int | None = None, seed: int = 0) -> AttentionNet:
    torch.manual_seed(seed)
    return AttentionNet(kdim).requires_grad_(False).eval()


def batch(seed: int = 1, size: int = 3) -> dict[str, torch.Tensor]:
    return {"state": torch.randn(size, 5, 4, generator=torch.Generator().manual_seed(seed))}


def trained_adapter(net: nn.Module, name: str, seed: int) -> None:
    inject_lora(net, LoRAConfig(rank=2, targets=TARGETS), name, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in lora_layers(net).values():
            if name in layer.adapters:
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.05)


def weights(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.attn.base_layer.state_dict(keep_vars=True).items()} \
        if isinstance(net.attn, LoRAMultiheadAttention) else {k: v.clone() for k, v in net.attn.state_dict().items()}


@pytest.mark.parametrize("kdim", [None, KDIM])
def test_fresh_adapter_changes_nothing(kdim):
    net, x = frozen(kdim), batch()
    with torch.no_grad():
        before = net.predict_chunk(x)
    inject_lora(net, LoRAConfig(rank=4, targets=TARGETS), "fresh")
    set_active_adapter(net, "fresh")
    with torch.no_grad():
        assert (net.predict_chunk(x) - before).abs().max().item() == 0.0


@pytest.mark.parametrize("kdim", [None, KDIM])
def test_merged_equals_unmerged_and_unmerge_is_bit_exact(kdim):
    net, x = frozen(kdim), batch()
    w0 = {k: v.detach().clone() for k, v in net.attn.state_dict().items()}
    trained_adapter(net, "a", 0)
    set_active_adapter(net, "a")
    with torch.no_grad():
        unmerged = net.predict_chunk(x)
    set_active_adapter(net, None)
    merge_adapter(net, "a")
    with torch.no_grad():
        merged = net.predict_chunk(x)
    assert (merged - unmerged).abs().max().item() <= 1e-5
    state = {k.replace("base_layer.", ""): v for k, v in net.attn.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(state[k], w0[k]) for k in w0), "state_dict stores W0 while merged"
    unmerge(net)
    assert all(torch.equal(v, w0[k]) for k, v in weights(net).items())


def test_gradients_reach_only_the_attention_loras():
    net = frozen()
    trained_adapter(net, "a", 0)
    set_active_adapter(net, "a")
    net.train()
    loss, _ = net(batch())
    loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    assert {n.split(".lora_")[0] for n in grads} == {"attn.q", "attn.k", "attn.v", "attn.out_proj", "head"}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n)


@pytest.mark.parametrize("kdim", [None, KDIM])
def test_unmerge_is_bit_exact_after_10k_random_operations(kdim):
    net = frozen(kdim)
    w0 = weights(net)
    for i, name in enumerate("abc"):
        trained_adapter(net, name, i)
    rng = random.Random(0)
    for _ in range(10_000):
        op = rng.random()
        if op < 0.45:
            merge_adapter(net, rng.choice(["a", "b", "c", {"a": 0.5, "c": -1.0}]))
        elif op < 0.9:
            unmerge(net)
        else:
            set_active_adapter(net, rng.choice([None, "a", "b"]))
    unmerge(net)
    assert all(torch.equal(v, w0[k]) for k, v in weights(net).items())


@pytest.mark.parametrize("kdim", [None, KDIM])
def test_strip_gives_a_plain_attention_module_equal_to_the_merged_one(kdim):
    net, x = frozen(kdim), batch()
    trained_adapter(net, "a", 0)
    merge_adapter(net, "a")
    with torch.no_grad():
        merged = net.predict_chunk(x)
    unmerge(net)
    strip_lora(net, "a")
    assert type(net.attn) is nn.MultiheadAttention and not lora_layers(net)
    net.requires_grad_(False)
    with torch.no_grad():
        assert (net.predict_chunk(x) - merged).abs().max().item() <= 1e-6


def test_lora_dropout_is_refused_on_attention_projections():
    net = frozen()
    with pytest.raises(ValueError, match="dropout"):
        inject_lora(net, LoRAConfig(rank=2, dropout=0.1, targets=TARGETS))
    assert type(net.attn) is nn.MultiheadAttention and not lora_layers(net)


def adapters_for(kdim: int | None):
    source = frozen(kdim)
    out = {}
    for i, name in enumerate(("s1", "s2", "s3")):
        trained_adapter(source, name, i)
        out[name] = adapter_from_policy(source, name)
    return out


@pytest.mark.parametrize("kdim", [None, KDIM])
@pytest.mark.parametrize("mode", MODES)
def test_skill_manager_modes_match_merged_references_and_restore_the_base(mode, kdim):
    adapters, x = adapters_for(kdim), batch()
    refs = {}
    for name, adapter in adapters.items():
        ref = frozen(kdim)
        attach(ref, adapter, check_fingerprint=False)
        merge_adapter(ref, name)
        with torch.no_grad():
            refs[name] = ref.predict_chunk(x)
    policy = frozen(kdim)
    with torch.no_grad():
        refs[None] = policy.predict_chunk(x)
    w0 = weights(policy)
    mgr = SkillManager(policy, mode)
    for name, adapter in adapters.items():
        assert mgr.attach(name, adapter).live
    rng = random.Random(1)
    for _ in range(300):
        name = rng.choice([None, "s1", "s2", "s3"])
        mgr.activate(name)
        out = mgr.predict_chunk(x)
        tolerance = 0.0 if name is None else 1e-5
        assert (out - refs[name]).abs().max().item() <= tolerance, (mode, name)
    mgr.close()
    assert type(policy.attn) is nn.MultiheadAttention
    assert all(torch.equal(v, w0[k]) for k, v in weights(policy).items())


def test_bank_mode_rebinds_the_packed_weight_and_steps_the_plain_forward():
    policy = frozen()
    mgr = SkillManager(policy, "bank")
    for name, adapter in adapters_for(None).items():
        mgr.attach(name, adapter)
    mha = policy.attn.base_layer
    original = mha.in_proj_weight
    mgr.activate("s1")
    mgr.predict_chunk(batch())
    assert mha.in_proj_weight is not original and policy.attn.forward == mha.forward
    mgr.activate(None)
    mgr.predict_chunk(batch())
    assert mha.in_proj_weight is original
