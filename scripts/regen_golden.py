"""Regenerate the export's golden files (tests/artifacts/export_golden/) on purpose.

Usage:
    python scripts/regen_golden.py            # rewrites tests/artifacts/export_golden/

Writes a fixed-seed tiny base checkpoint (``base/``), a "trained" tiny skill adapter with non-zero B and a skill
token (``skill/``), and ``expected.safetensors``: fixed probe observations and the torch reference outputs on them
(the unmerged base + active adapter for the skill, the plain base with each probe's task id for the base).
``tests/test_export.py::test_golden_outputs`` re-exports both bundles from these files and requires the exported
outputs to stay within 1e-5 of the stored ones. Run this only when a change is meant to alter what exported
policies compute, and say so in the commit message.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from robolora.adapters import adapter_from_policy, attach_for_eval, save_adapter
from robolora.config import LoRAConfig
from robolora.inject import inject_lora, lora_layers
from robolora.policies import PolicyConfig, VisuomotorPolicy, load_policy, save_policy

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "artifacts" / "export_golden"
PROPRIO_LOW = np.array([-0.4, -0.38, -0.08, -2, -2, -2, -0.01, -0.01, -0.02, -1], np.float32)
PROPRIO_HIGH = np.array([0.4, 0.4, 0.4, 2, 2, 2, 0.05, 0.05, 0.1, 1], np.float32)


def build(out: Path) -> dict[str, tuple[int, ...]]:
    torch.manual_seed(0)
    base = VisuomotorPolicy(PolicyConfig.preset("tiny")).eval()
    g = torch.Generator().manual_seed(1)
    base.set_normalization({"proprio_mean": torch.rand(10, generator=g) * 0.1,
                            "proprio_std": 0.05 + torch.rand(10, generator=g) * 0.5})
    save_policy(base, out / "base", metadata={"purpose": "golden test of robolora.export"})
    inject_lora(base, LoRAConfig(rank=4, alpha=8.0), "wipe", generator=g)
    with torch.no_grad():
        for layer in lora_layers(base).values():
            layer.lora_B["wipe"].normal_(0, 0.1, generator=g)
    base.set_skill_token(torch.nn.Parameter(torch.randn(base.config.d_model, generator=g)))
    save_adapter(adapter_from_policy(base, "wipe"), out / "skill")

    rng = np.random.default_rng(2)
    n = 4
    probe = {"probe.rgb_front": torch.from_numpy(rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)),
             "probe.proprio": torch.from_numpy(rng.uniform(PROPRIO_LOW, PROPRIO_HIGH, (n, 10)).astype(np.float32)),
             "probe.task_id": torch.arange(n, dtype=torch.long) % base.config.num_tasks}
    batch = {k.split(".", 1)[1]: v for k, v in probe.items()}
    reference = load_policy(out / "base")
    with torch.no_grad():
        expected_base = reference.predict_chunk(batch)
        attach_for_eval(reference, out / "skill")
        expected_skill = reference.predict_chunk(batch)
    tensors = {**probe, "expected.base": expected_base.contiguous(), "expected.skill": expected_skill.contiguous()}
    save_file(tensors, str(out / "expected.safetensors"))
    return {k: tuple(v.shape) for k, v in tensors.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=GOLDEN, help="folder to (re)write")
    args = parser.parse_args(argv)
    for name, shape in build(args.out).items():
        print(f"{name:16s} {shape}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
