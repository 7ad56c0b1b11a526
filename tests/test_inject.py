"""Injection by name pattern, model-wide adapter control, strip, and safetensors round trips (docs/design.md §4)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from robolora.config import LoRAConfig
from robolora.inject import (
    count_parameters,
    inject_lora,
    lora_layers,
    mark_only_lora_trainable,
    merge_adapter,
    remove_adapter,
    set_active_adapter,
    strip_lora,
    target_matches,
    unmerge,
)
from robolora.lora import LoRALinear

D, HEADS, LAYERS = 16, 2, 2
ALL_ATTN = [f"blocks.{i}.attn.{p}" for i in range(LAYERS) for p in "qkvo"]


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, HEADS, D // HEADS).transpose(1, 2) for p in (self.q, self.k, self.v))  # (B,H,T,Dh)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, D))  # (B,T,D)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = Attention()
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,T,D) -> (B,T,3)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_model(seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer()


def randomize_adapter(model: nn.Module, name: str, seed: int, scale: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.adapters:
                for param in (layer.lora_A[name], layer.lora_B[name]):
                    param.copy_(torch.randn(param.shape, generator=gen).to(param.dtype) * scale)


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, type], dict[str, bool]]:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: type(m) for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_same(before: tuple, after: tuple) -> None:
    (state_a, types_a, grads_a), (state_b, types_b, grads_b) = before, after
    assert types_a == types_b and grads_a == grads_b and state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


# ---------------------------------------------------------------------------------------------- patterns


def test_target_matches_exact_suffix_and_regex() -> None:
    assert target_matches("blocks.0.attn.q", "blocks.0.attn.q")
    assert target_matches("blocks.0.attn.q", "attn.q") and target_matches("attn.q", "attn.q")
    assert not target_matches("blocks.0.attn.qq", "attn.q") and not target_matches("blocks.0.xattn.q", "attn.q")
    assert target_matches("blocks.1.mlp.fc2", r"re:blocks\.\d\.mlp\.fc\d")
    assert not target_matches("blocks.1.mlp.fc2", "re:mlp")  # regexes match the whole name


def test_inject_default_targets_wraps_attention_projections_only() -> None:
    model = make_model()
    wrapped = inject_lora(model, LoRAConfig(rank=4))
    assert wrapped == ALL_ATTN and sorted(lora_layers(model)) == sorted(ALL_ATTN)
    assert isinstance(model.blocks[0].mlp.fc1, nn.Linear) and isinstance(model.head, nn.Linear)


def test_inject_regex_and_suffix_do_not_overmatch() -> None:
    model = nn.ModuleDict({"attn": nn.ModuleDict({"q": nn.Linear(4, 4), "qq": nn.Linear(4, 4)})})
    assert inject_lora(model, LoRAConfig(rank=2, targets=("attn.q",))) == ["attn.q"]
    model = make_model()
    assert inject_lora(model, LoRAConfig(rank=2, targets=(r"re:blocks\.1\.mlp\.fc\d",))) == [
        "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"
    ]


def test_pattern_matching_nothing_lists_existing_layers() -> None:
    model = make_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\['attn\.qq'\] match no nn.Linear.*blocks\.0\.attn\.k.*head"):
        inject_lora(model, LoRAConfig(targets=("attn.q", "attn.qq")))
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("fused", [lambda: nn.TransformerEncoderLayer(D, HEADS),
                                   lambda: nn.TransformerDecoderLayer(D, HEADS)])
def test_fused_transformer_layers_are_refused_with_the_alternative(fused) -> None:
    model = nn.Sequential(nn.Linear(D, D), fused())
    with pytest.raises(ValueError, match="fused transformer layers.*nn.MultiheadAttention"):
        inject_lora(model, LoRAConfig(targets=("0",)))
    assert isinstance(model[0], nn.Linear)


def test_multihead_attention_projections_are_targets_named_by_module_path() -> None:
    model = nn.Sequential(nn.Linear(D, D), nn.MultiheadAttention(D, HEADS, batch_first=True))
    names = inject_lora(model, LoRAConfig(targets=("1.q", "1.v", "1.out_proj", "0")))
    assert names == ["0", "1.q", "1.v", "1.out_proj"]
    assert sorted(lora_layers(model)) == ["0", "1.k", "1.out_proj", "1.q", "1.v"]
    assert lora_layers(model)["1.k"].adapters == []


# ---------------------------------------------------------------------------------------------- atomicity


def test_failure_midway_leaves_model_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    inject_lora(model, LoRAConfig(rank=2, targets=("blocks.0.attn.q",)), "first")
    before = snapshot(model)
    calls = {"n": 0}
    original_add = LoRALinear.add_adapter

    def flaky_add(self: LoRALinear, *args, **kwargs) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated failure")
        original_add(self, *args, **kwargs)

    monkeypatch.setattr(LoRALinear, "add_adapter", flaky_add)
    with pytest.raises(RuntimeError, match="simulated"):
        inject_lora(model, LoRAConfig(rank=2), "second")
    assert calls["n"] == 5
    assert_same(before, snapshot(model))
    assert lora_layers(model)["blocks.0.attn.q"].adapters == ["first"]


def test_existing_adapter_name_is_refused_and_wrapped_layers_get_more_adapters() -> None:
    model = make_model()
    inject_lora(model, LoRAConfig(rank=2, targets=("blocks.0.attn.q",)), "a")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'a' already exists in \['blocks.0.attn.q'\]"):
        inject_lora(model, LoRAConfig(rank=2), "a")
    assert_same(before, snapshot(model))
    inject_lora(model, LoRAConfig(rank=2, targets=("attn.q",)), "b")
    assert lora_layers(model)["blocks.0.attn.q"].adapters == ["a", "b"]
    assert lora_layers(model)["blocks.1.attn.q"].adapters == ["b"]


# ---------------------------------------------------------------------------------------------- model-wide control


def test_fresh_adapter_changes_no_model_output() -> None:
    model = make_model()
    x = torch.randn(2, 5, D)
    before = model(x)
    inject_lora(model, LoRAConfig(rank=4, targets=("attn.q", "attn.v", "mlp.fc1", "head")))
    set_active_adapter(model, "default")
    assert torch.equal(model(x), before)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_model_merged_matches_unmerged(dtype: torch.dtype, tol: float) -> None:
    # bf16: merged and unmerged round differently in every layer; on outputs of magnitude ~1.5 the max abs gap
    # observed over 10 seeds is 0.016 (2 ulps at that magnitude), so the bound is 0.05. fp32: 1e-5 (observed 5e-7).
    model = make_model().to(dtype)
    inject_lora(model, LoRAConfig(rank=4, targets=("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc1", "mlp.fc2")))
    randomize_adapter(model, "default", seed=1)
    x = torch.randn(4, 6, D, dtype=dtype)
    set_active_adapter(model, "default")
    with torch.no_grad():
        unmerged = model(x).float()
        merge_adapter(model, "default")
        merged = model(x).float()
        assert (merged - unmerged).abs().max().item() < tol
        unmerge(model)
        assert torch.equal(model(x).float(), unmerged)


def test_adapters_on_different_layers_activate_and_blend() -> None:
    model = make_model()
    inject_lora(model, LoRAConfig(rank=2, targets=("attn.q",)), "a")
    inject_lora(model, LoRAConfig(rank=2, targets=("mlp.fc1",)), "b")
    randomize_adapter(model, "a", seed=1)
    randomize_adapter(model, "b", seed=2)
    set_active_adapter(model, {"a": 0.5, "b": 1.0})
    assert lora_layers(model)["blocks.0.attn.q"].active == {"a": 0.5}
    assert lora_layers(model)["blocks.0.mlp.fc1"].active == {"b": 1.0}
    x = torch.randn(2, 5, D)
    blended = model(x)
    set_active_adapter(model, None)
    merge_adapter(model, {"a": 0.5, "b": 1.0})
    assert (model(x) - blended).abs().max().item() < 1e-5
    merge_adapter(model, "a")
    assert lora_layers(model)["blocks.0.mlp.fc1"].merged is None
    with pytest.raises(KeyError, match=r"'pour'.*attached: \['a', 'b'\]"):
        set_active_adapter(model, "pour")


def test_model_merge_with_nan_rolls_back_every_layer() -> None:
    model = make_model()
    inject_lora(model, LoRAConfig(rank=2))
    randomize_adapter(model, "default", seed=1)
    merge_adapter(model, "default")
    inject_lora(model, LoRAConfig(rank=2), "bad")
    randomize_adapter(model, "bad", seed=2)
    with torch.no_grad():
        lora_layers(model)["blocks.1.attn.o"].lora_B["bad"][0, 0] = float("inf")
    weights = {n: layer.base_layer.weight.clone() for n, layer in lora_layers(model).items()}
    with pytest.raises(ValueError, match="NaN/Inf"):
        merge_adapter(model, {"default": 1.0, "bad": 0.5})
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.base_layer.weight, weights[name]) and layer.merged == {"default": 1.0}


def test_remove_adapter_everywhere() -> None:
    model = make_model()
    inject_lora(model, LoRAConfig(rank=2), "a")
    inject_lora(model, LoRAConfig(rank=2, targets=("attn.q",)), "b")
    merge_adapter(model, "a")
    with pytest.raises(RuntimeError, match="unmerge"):
        remove_adapter(model, "a")
    unmerge(model)
    remove_adapter(model, "a")
    assert {n: layer.adapters for n, layer in lora_layers(model).items() if layer.adapters} == {
        "blocks.0.attn.q": ["b"], "blocks.1.attn.q": ["b"]
    }


def test_gradients_reach_only_lora_and_extra_parameters() -> None:
    model = make_model()
    inject_lora(model, LoRAConfig(rank=2))
    randomize_adapter(model, "default", seed=1)
    token = nn.Parameter(torch.zeros(D))
    model.register_parameter("skill_token", token)
    mark_only_lora_trainable(model, extra=[token])
    set_active_adapter(model, "default")
    (model(torch.randn(2, 5, D) + token).pow(2).mean()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in model.named_parameters() if ".lora_" in n} | {"skill_token"}


def test_count_parameters_per_layer_and_overall() -> None:
    model = make_model()
    total_plain = sum(p.numel() for p in model.parameters())
    inject_lora(model, LoRAConfig(rank=4))
    mark_only_lora_trainable(model)
    counts = count_parameters(model)
    per_layer_lora = 4 * D + D * 4
    assert counts["layers"]["blocks.0.attn.q"] == {"trainable": per_layer_lora, "total": D * D + D + per_layer_lora}
    assert counts["layers"]["blocks.0.mlp.fc1"] == {"trainable": 0, "total": D * 4 * D + 4 * D}
    assert counts["trainable"] == 8 * per_layer_lora and counts["total"] == total_plain + 8 * per_layer_lora
    assert counts["percent"] == pytest.approx(100 * counts["trainable"] / counts["total"])


@pytest.mark.parametrize("merge", [None, "a"])
def test_strip_leaves_plain_linears_with_w0_or_merged_weights(merge: str | None) -> None:
    model = make_model()
    x = torch.randn(2, 5, D)
    plain_out = model(x)
    inject_lora(model, LoRAConfig(rank=4, targets=("attn.q", "mlp.fc2")), "a")
    randomize_adapter(model, "a", seed=1)
    merge_adapter(model, "a")
    merged_out = model(x)
    mark_only_lora_trainable(model)
    assert strip_lora(model, merge=merge) == [f"blocks.{i}.{n}" for i in range(LAYERS) for n in ("attn.q", "mlp.fc2")]
    assert not lora_layers(model) and not any(".lora_" in n or "base_layer" in n for n, _ in model.state_dict().items())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith((".q", ".fc2")))
    assert all(p.requires_grad for p in model.blocks[0].attn.q.parameters())
    assert torch.equal(model(x), plain_out if merge is None else merged_out)


def test_safetensors_round_trip_of_lora_state_is_bit_exact(tmp_path: Path) -> None:
    model = make_model()
    inject_lora(model, LoRAConfig(rank=4, targets=("attn.q", "attn.v", "mlp.fc1")), "a")
    randomize_adapter(model, "a", seed=1)
    set_active_adapter(model, "a")
    save_file(lora_state(model), str(tmp_path / "adapter.safetensors"))
    fresh = make_model()
    inject_lora(fresh, LoRAConfig(rank=4, targets=("attn.q", "attn.v", "mlp.fc1")), "a")
    result = fresh.load_state_dict(load_file(str(tmp_path / "adapter.safetensors")), strict=False)
    assert not result.unexpected_keys and all(".lora_" not in k for k in result.missing_keys)
    loaded = lora_state(fresh)
    assert loaded.keys() == lora_state(model).keys()
    assert all(torch.equal(loaded[k], v) for k, v in lora_state(model).items())
    set_active_adapter(fresh, "a")
    x = torch.randn(2, 5, D)
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_base_weights_bit_identical_after_random_operations(dtype: torch.dtype) -> None:
    model = make_model().to(dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    rng = random.Random(0)
    patterns = [("attn.q",), ("attn.v", "mlp.fc1"), ("attn.q", "attn.k", "attn.v", "attn.o"), ("head",)]
    counter = 0
    for _ in range(300):
        names = sorted({a for layer in lora_layers(model).values() for a in layer.adapters})
        op = rng.choice(["inject", "merge", "unmerge", "activate", "remove"])
        if op == "inject" or not names:
            counter += 1
            inject_lora(model, LoRAConfig(rank=rng.randint(1, 4), targets=rng.choice(patterns)), f"s{counter}")
            randomize_adapter(model, f"s{counter}", seed=counter, scale=rng.uniform(0.01, 1.0))
        elif op == "merge":
            merge_adapter(model, {n: rng.uniform(-1, 1) for n in rng.sample(names, min(2, len(names)))})
        elif op == "unmerge":
            unmerge(model)
        elif op == "activate":
            set_active_adapter(model, rng.choice([None, rng.choice(names)]))
        else:
            unmerge(model)
            remove_adapter(model, rng.choice(names))
    strip_lora(model)
    assert model.state_dict().keys() == original.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inject_merge_strip() -> None:
    model = make_model()
    x = torch.randn(2, 5, D)
    inject_lora(model, LoRAConfig(rank=4), "a")
    randomize_adapter(model, "a", seed=1)
    set_active_adapter(model, "a")
    on_cpu = model(x)
    model.cuda()
    assert (model(x.cuda()).cpu() - on_cpu).abs().max().item() < 1e-4
    merge_adapter(model, "a")
    assert (model(x.cuda()).cpu() - on_cpu).abs().max().item() < 1e-4
    strip_lora(model, merge="a")
    assert (model(x.cuda()).cpu() - on_cpu).abs().max().item() < 1e-4
