"""DDP: W processes with batch b train as one process with batch W * b, up to float rounding (robolora.train).

The two-process run uses torchrun on the CPU (gloo); tests/ddp_worker.py is one of its processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from ddp_worker import PER_PROCESS_BATCH, PROCESSES, PaddedDemos, config, policy, sample_weights
from safetensors.torch import load_file

from robolora.train import BatchSampler, train

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_process_shares_make_up_the_one_process_batch():
    weights = torch.rand(50)
    whole = BatchSampler(50, 12, seed=4, weights=weights)
    shares = [BatchSampler(50, 4, seed=4, rank=r, world_size=3, weights=weights) for r in range(3)]
    for step in (0, 7):
        assert sum((s.indices(step) for s in shares), []) == whole.indices(step)
        for view, offsets in enumerate(whole.shift_offsets(step, 4, views=2)):
            assert torch.equal(torch.cat([s.shift_offsets(step, 4, views=2)[view] for s in shares]), offsets)


def test_two_processes_train_like_one_with_the_global_batch(tmp_path):
    env = {**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          str(PROCESSES), str(WORKER), str(tmp_path / "ddp")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    ddp_s = time.perf_counter() - started
    one = policy()
    train(one, PaddedDemos(), config(PROCESSES * PER_PROCESS_BATCH), tmp_path / "one",
          sample_weights=sample_weights())
    saved = load_file(str(tmp_path / "ddp" / "train_state.safetensors"))
    trained = {name: p.detach() for name, p in one.named_parameters() if p.requires_grad}
    assert {key.removeprefix("param/") for key in saved if key.startswith("param/")} == trained.keys()
    diffs = {name: float((saved[f"param/{name}"] - value).abs().max()) for name, value in trained.items()}
    moved = float((trained["action_head.weight"] - policy().action_head.weight.detach()).abs().max())
    print(f"DDP max abs diff {max(diffs.values()):.3g} (weights moved up to {moved:.3g}); torchrun {ddp_s:.1f} s")
    assert moved > 1e-3, "the runs must train for the comparison to mean anything"
    assert max(diffs.values()) <= 1e-6, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
