"""One process of test_ddp's two-process run: train the tiny policy on padded synthetic demos.

Usage (what test_ddp runs): python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT
The trained weights are the ``param/`` tensors of OUT/train_state.safetensors, written by rank 0.
"""

from __future__ import annotations

import sys

import torch
from test_train import SyntheticDemos, tiny_policy

from robolora.policies import VisuomotorPolicy
from robolora.train import TrainConfig, train

PROCESSES = 2
PER_PROCESS_BATCH = 4


def config(batch_size: int) -> TrainConfig:
    """Random shifts on, so the test also checks that the processes shift their shares as one process would."""
    return TrainConfig(steps=24, batch_size=batch_size, lr=1e-3, warmup_steps=2, log_every=8, checkpoint_every=24,
                       augment_shift=4, device="cpu")


def policy() -> VisuomotorPolicy:
    """The tiny policy with its attention key biases frozen. Softmax ignores a shift common to all keys, so their
    gradient is zero but for rounding, and Adam, dividing by the gradient's own scale, turns that rounding into
    updates that differ by ~1e-6 between any two summation orders (one process or two); every other weight agrees
    within ~1e-7."""
    model = tiny_policy()
    for name, param in model.named_parameters():
        param.requires_grad_(not name.endswith("attn.k.bias"))
    return model


class PaddedDemos(SyntheticDemos):
    """Synthetic demos whose chunks end in padding of random length, so the processes' shares of a batch hold
    different numbers of valid action steps (the case where averaging per-process mean losses would be wrong)."""

    def __init__(self) -> None:
        super().__init__(n=24)
        g = torch.Generator().manual_seed(1)
        valid = torch.randint(1, self.k + 1, (len(self),), generator=g)  # at least one valid step per chunk
        self.is_pad = torch.arange(self.k)[None] >= valid[:, None]  # (n, K)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**super().__getitem__(i), "action_is_pad": self.is_pad[i]}


def sample_weights() -> torch.Tensor:
    return torch.linspace(1.0, 3.0, len(PaddedDemos()))


if __name__ == "__main__":
    torch.set_num_threads(1)
    train(policy(), PaddedDemos(), config(PER_PROCESS_BATCH), sys.argv[1], sample_weights=sample_weights())
