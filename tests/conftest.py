"""Shared pytest set-up: one torch thread (small tensors on 2 shared cores run far faster that way, and
results are reproducible), no Prefect telemetry, mmengine-style checkpoint loading allowed."""

import os

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
