"""Command-line entry points: argument parsing and a call into the packages."""

from __future__ import annotations

import os

OFFLINE_CPU = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
}


def set_offline_cpu_defaults() -> None:
    """Offline and on CPU unless the environment says otherwise (the embedded benchmark's CLIs). Call it
    before importing the packages: timm reads the hub settings when it is imported."""
    for key, value in OFFLINE_CPU.items():
        os.environ.setdefault(key, value)
