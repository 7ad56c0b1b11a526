"""Shared test set-up: headless MuJoCo rendering through EGL (chosen before anything imports mujoco) and one torch
thread: the tests use tiny models, and on a loaded 2-core machine a second OpenMP thread made rollouts 10x slower."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import torch  # noqa: E402

torch.set_num_threads(1)
