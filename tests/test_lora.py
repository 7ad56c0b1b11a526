"""LoRAConfig and LoRALinear: the LoRA maths, exact merge/unmerge, adapter bookkeeping (docs/design.md §4)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from torch import nn

from robolora.config import LoRAConfig
from robolora.lora import LoRALinear

# bf16 keeps 8 mantissa bits: merged (one rounding of W0 + delta) and unmerged (rounded products and sums) outputs
# agree to a few bf16 ulps of the output's magnitude, not to fp32's 1e-5. Tolerance: max abs error < 2e-2 * max |out|
# (observed <= 7.3e-3 over 20 seeds on a 16 -> 12 layer).
BF16_REL_TOL = 2e-2


def make_layer(d_in: int = 16, d_out: int = 12, dtype: torch.dtype = torch.float32, seed: int = 0) -> LoRALinear:
    torch.manual_seed(seed)
    return LoRALinear(nn.Linear(d_in, d_out).to(dtype))


def train_like(layer: LoRALinear, name: str, seed: int, scale: float = 0.1) -> None:
    """Give an adapter non-zero B (and a new A), as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (layer.lora_A[name], layer.lora_B[name]):
            param.copy_(torch.randn(param.shape, generator=gen) * scale)


# ---------------------------------------------------------------------------------------------- LoRAConfig


@pytest.mark.parametrize(
    ("field", "value"),
    [("rank", 0), ("rank", 2.5), ("rank", True), ("alpha", 0.0), ("alpha", float("nan")), ("targets", ()),
     ("targets", "attn.q"), ("targets", ("",)), ("targets", ("re:(",)), ("dropout", 1.0), ("dropout", -0.1),
     ("init_std", 0.0), ("init_std", float("inf")), ("rslora", 1)],
)
def test_config_rejects_bad_values_naming_field_and_value(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as err:
        LoRAConfig(**{field: value})
    assert repr(value) in str(err.value) or (field == "targets" and isinstance(value, tuple))


def test_config_scaling_std_and_json_round_trip() -> None:
    assert LoRAConfig(rank=8, alpha=16.0).scaling == 2.0
    assert LoRAConfig(rank=16, alpha=8.0, rslora=True).scaling == pytest.approx(2.0)
    assert LoRAConfig(rank=4).std == 0.25 and LoRAConfig(rank=4, init_std=0.02).std == 0.02
    config = LoRAConfig(rank=4, alpha=8.0, targets=("attn.q", "re:.*fc1"), dropout=0.1, init_std=0.02, rslora=True)
    assert LoRAConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown LoRAConfig fields.*'rnak'"):
        LoRAConfig.from_dict({"rnak": 4})


# ---------------------------------------------------------------------------------------------- LoRALinear


def test_wrapping_freezes_base_and_keeps_w0_pristine() -> None:
    layer = make_layer()
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    assert layer.base_requires_grad == {"weight": True, "bias": True}
    assert torch.equal(layer.pristine_weight, layer.base_layer.weight)
    assert layer.pristine_weight.data_ptr() != layer.base_layer.weight.data_ptr()
    assert "pristine_weight" not in dict(layer.named_parameters()) and "pristine_weight" not in layer.state_dict()


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_fresh_adapter_changes_no_output(dropout: float) -> None:
    layer = make_layer()
    x = torch.randn(5, 16)
    before = layer(x)
    layer.add_adapter("a", rank=4, dropout=dropout)
    layer.set_active("a")
    layer.train()
    assert torch.equal(layer(x), before)
    layer.merge("a")
    assert torch.equal(layer.base_layer.weight, layer.pristine_weight)


def test_init_std_and_zero_b() -> None:
    layer = make_layer(d_in=4096, d_out=8)
    layer.add_adapter("default_std", rank=4, generator=torch.Generator().manual_seed(0))
    layer.add_adapter("custom_std", rank=4, init_std=0.02, generator=torch.Generator().manual_seed(0))
    assert layer.lora_A["default_std"].std().item() == pytest.approx(0.25, rel=0.03)
    assert layer.lora_A["custom_std"].std().item() == pytest.approx(0.02, rel=0.03)
    assert layer.lora_A["default_std"].mean().abs().item() < 0.01
    assert not layer.lora_B["default_std"].any()
    twin = make_layer(d_in=4096, d_out=8)
    twin.add_adapter("default_std", rank=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(twin.lora_A["default_std"], layer.lora_A["default_std"])


@pytest.mark.parametrize("rslora", [False, True])
def test_delta_weight_and_forward_follow_the_formula(rslora: bool) -> None:
    layer = make_layer()
    layer.add_adapter("a", rank=4, alpha=6.0, rslora=rslora)
    train_like(layer, "a", seed=1)
    s = 6.0 / (math.sqrt(4) if rslora else 4)
    a, b = layer.lora_A["a"].detach(), layer.lora_B["a"].detach()
    torch.testing.assert_close(layer.delta_weight("a"), s * b @ a, rtol=0, atol=1e-6)
    x = torch.randn(3, 7, 16)
    layer.set_active("a")
    expected = layer.base_layer(x) + s * x @ a.T @ b.T
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)


def test_merged_equals_unmerged_fp32() -> None:
    layer = make_layer()
    layer.add_adapter("a", rank=4)
    train_like(layer, "a", seed=1)
    layer.set_active("a")
    x = torch.randn(64, 16)
    unmerged = layer(x)
    layer.merge("a")
    assert (layer(x) - unmerged).abs().max().item() < 1e-5
    assert not torch.equal(layer.base_layer.weight, layer.pristine_weight)


def test_merged_close_to_unmerged_bf16() -> None:
    layer = make_layer(dtype=torch.bfloat16)
    layer.add_adapter("a", rank=4)
    train_like(layer, "a", seed=1)
    assert layer.lora_A["a"].dtype == torch.bfloat16 and layer.delta_weight("a").dtype == torch.bfloat16
    layer.set_active("a")
    x = torch.randn(64, 16, dtype=torch.bfloat16)
    unmerged = layer(x).float()
    layer.merge("a")
    error = (layer(x).float() - unmerged).abs().max().item()
    assert error < BF16_REL_TOL * unmerged.abs().max().item()


def test_switching_a_b_a_restores_a_exactly() -> None:
    layer = make_layer()
    for i, name in enumerate(("a", "b")):
        layer.add_adapter(name, rank=4)
        train_like(layer, name, seed=i + 1)
    x = torch.randn(8, 16)
    layer.set_active("a")
    out_a = layer(x)
    layer.set_active("b")
    assert not torch.equal(layer(x), out_a)
    layer.set_active("a")
    assert torch.equal(layer(x), out_a)
    layer.set_active(None)
    layer.merge("a")
    merged_a = layer(x)
    layer.merge("b")
    layer.merge("a")
    assert torch.equal(layer(x), merged_a)


def test_merged_adapter_is_not_added_twice_but_others_still_run() -> None:
    layer = make_layer()
    for i, name in enumerate(("a", "b")):
        layer.add_adapter(name, rank=4)
        train_like(layer, name, seed=i + 1)
    x = torch.randn(8, 16)
    layer.set_active({"a": 1.0, "b": 0.5})
    blended = layer(x)
    layer.merge("a")
    assert (layer(x) - blended).abs().max().item() < 1e-5
    layer.set_active(None)
    layer.unmerge()
    assert torch.equal(layer(x), layer.base_layer(x))


def test_weighted_set_equals_linear_with_weighted_deltas() -> None:
    layer = make_layer()
    for i, name in enumerate(("a", "b")):
        layer.add_adapter(name, rank=4 + i, alpha=8.0)
        train_like(layer, name, seed=i + 1)
    w1, w2 = 0.7, -0.4
    reference = nn.Linear(16, 12)
    with torch.no_grad():
        reference.weight.copy_(layer.pristine_weight + w1 * layer.delta_weight("a") + w2 * layer.delta_weight("b"))
        reference.bias.copy_(layer.base_layer.bias)
    x = torch.randn(32, 16)
    layer.set_active({"a": w1, "b": w2})
    assert (layer(x) - reference(x)).abs().max().item() < 1e-5
    layer.set_active(None)
    layer.merge({"a": w1, "b": w2})
    assert (layer(x) - reference(x)).abs().max().item() < 1e-5


def test_gradients_reach_only_a_and_b() -> None:
    layer = make_layer()
    layer.add_adapter("a", rank=4)
    layer.add_adapter("idle", rank=2)
    train_like(layer, "a", seed=1)
    layer.set_active("a")
    layer(torch.randn(4, 16)).pow(2).sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    assert layer.lora_A["a"].grad.abs().sum() > 0 and layer.lora_B["a"].grad.abs().sum() > 0
    assert layer.lora_A["idle"].grad is None and layer.lora_B["idle"].grad is None


def test_dropout_only_on_lora_input_and_only_in_training() -> None:
    layer = make_layer()
    layer.add_adapter("a", rank=4, dropout=0.5)
    train_like(layer, "a", seed=1)
    layer.set_active("a")
    x = torch.randn(64, 16)
    layer.eval()
    expected = layer.base_layer(x) + layer.configs["a"].scaling * x @ layer.lora_A["a"].T @ layer.lora_B["a"].T
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.set_active(None)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_train_and_eval_never_merge_or_activate() -> None:
    layer = make_layer()
    layer.add_adapter("a", rank=4)
    train_like(layer, "a", seed=1)
    layer.train()
    layer.eval()
    assert layer.merged is None and layer.active == {}
    assert torch.equal(layer.base_layer.weight, layer.pristine_weight)


def test_nan_delta_merge_is_refused_and_weights_untouched() -> None:
    layer = make_layer()
    layer.add_adapter("good", rank=4)
    layer.add_adapter("bad", rank=4)
    train_like(layer, "good", seed=1)
    layer.merge("good")
    merged_good = layer.base_layer.weight.clone()
    with torch.no_grad():
        layer.lora_B["bad"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.merge({"good": 1.0, "bad": 1.0})
    assert torch.equal(layer.base_layer.weight, merged_good) and layer.merged == {"good": 1.0}


def test_bookkeeping_errors_name_the_fix() -> None:
    layer = make_layer()
    layer.add_adapter("a", rank=4)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("a")
    with pytest.raises(ValueError, match="without '.'"):
        layer.add_adapter("a.b")
    with pytest.raises(ValueError, match="clashes"):
        layer.add_adapter("keys")
    with pytest.raises(KeyError, match=r"unknown adapter.*'pour'.*attached: \['a'\]"):
        layer.set_active("pour")
    with pytest.raises(ValueError, match="finite"):
        layer.set_active({"a": float("nan")})
    with pytest.raises(ValueError, match="empty adapter set"):
        layer.merge({})
    layer.merge("a")
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.remove_adapter("a")
    layer.unmerge()
    layer.set_active("a")
    layer.remove_adapter("a")
    assert layer.adapters == [] and layer.active == {} and len(layer.lora_A) == 0


def test_state_dict_always_holds_w0_and_load_refreshes_pristine() -> None:
    layer = make_layer()
    layer.add_adapter("a", rank=4)
    train_like(layer, "a", seed=1)
    layer.merge("a")
    state = layer.state_dict()
    assert torch.equal(state["base_layer.weight"], layer.pristine_weight)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.load_state_dict(state)
    layer.unmerge()
    new_w0 = torch.randn(12, 16)
    layer.load_state_dict({**state, "base_layer.weight": new_w0})
    assert torch.equal(layer.pristine_weight, new_w0) and torch.equal(layer.base_layer.weight, new_w0)
    layer.merge("a")
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, new_w0)


def test_to_dtype_moves_pristine_with_the_weights() -> None:
    layer = make_layer()
    layer.add_adapter("a", rank=4)
    layer.to(torch.bfloat16)
    assert layer.pristine_weight.dtype == torch.bfloat16 and layer.lora_B["a"].dtype == torch.bfloat16
    assert torch.equal(layer.pristine_weight, layer.base_layer.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_base_weights_bit_identical_after_10k_random_operations(dtype: torch.dtype) -> None:
    layer = make_layer(d_in=8, d_out=6, dtype=dtype)
    original = layer.base_layer.weight.detach().clone()
    rng = random.Random(0)
    counter = 0
    for _ in range(10_000):
        names = layer.adapters
        op = rng.choice(["attach", "merge", "unmerge", "activate", "remove"])
        if op == "attach" or not names:
            counter += 1
            layer.add_adapter(f"s{counter}", rank=rng.randint(1, 4), alpha=rng.uniform(0.5, 8.0))
            train_like(layer, f"s{counter}", seed=counter, scale=rng.uniform(0.01, 1.0))
        elif op == "merge":
            picked = rng.sample(names, rng.randint(1, min(3, len(names))))
            layer.merge({n: rng.uniform(-1.5, 1.5) for n in picked})
        elif op == "unmerge":
            layer.unmerge()
            assert torch.equal(layer.base_layer.weight, original)
        elif op == "activate":
            layer.set_active(rng.choice([None, rng.choice(names), {n: rng.uniform(-1, 1) for n in names}]))
        else:
            victim = rng.choice(names)
            if victim in (layer.merged or {}):
                layer.unmerge()
            layer.remove_adapter(victim)
        assert torch.equal(layer.pristine_weight, original)
    assert torch.equal(layer.state_dict()["base_layer.weight"], original)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_merge_unmerge_and_forward(dtype: torch.dtype) -> None:
    layer = make_layer(dtype=dtype)
    layer.add_adapter("a", rank=4)
    train_like(layer, "a", seed=1)
    original = layer.pristine_weight.clone()
    layer.set_active("a")
    x = torch.randn(16, 16, dtype=dtype)
    on_cpu = layer(x).float()
    layer.cuda()
    assert layer.lora_A["a"].is_cuda and layer.pristine_weight.is_cuda
    unmerged = layer(x.cuda()).float().cpu()
    layer.merge("a")
    merged = layer(x.cuda()).float().cpu()
    tol = 1e-4 if dtype == torch.float32 else BF16_REL_TOL * on_cpu.abs().max().item()
    assert (unmerged - on_cpu).abs().max().item() < tol and (merged - unmerged).abs().max().item() < tol
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight.cpu(), original)
