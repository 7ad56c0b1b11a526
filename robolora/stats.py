"""Evaluation conventions shared by the torch side (robolora.evaluate) and the torch-free controller.

Imports numpy-free standard library only, so ``robolora.controller`` can use it on a machine without torch.
"""

from __future__ import annotations

import math

# Held-out evaluation seeds start here; demos are collected from seed 0 upwards, so the two never meet.
EVAL_SEED = 10_000_000
# Validation seeds (choosing checkpoints, seeds or recipes) start here, so a choice never sees a held-out episode.
VALIDATION_SEED = 30_000_000


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (better than the normal one near 0 and 1)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    # At p = 0 or 1 the bound is exactly 0 or 1 in exact arithmetic; in floats it can miss by a rounding error, and a
    # plotted error bar (rate - low, high - rate) must not go negative.
    return (0.0 if successes == 0 else low), (1.0 if successes == n else high)
