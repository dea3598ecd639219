"""Where the scan and conv dispatch read their inputs: the MUSE_SCAN / MUSE_CONV overrides and the
kernel device test. `scan.py` and `conv.py` both import this module (neither imports the other).

Contracts:
- `env_choice(var)`: None when `var` is unset, empty or "auto"; else its lower-cased value, which must be
  one of `ENV_CHOICES[var]` (ValueError otherwise).
- `on_kernel_device(x)`: True where the CUDA kernels can read x. Callers look it up on this module at
  call time (`dispatch.on_kernel_device(x)`), so a test patches this one name to take the CUDA branch
  with CPU tensors.
"""

from __future__ import annotations

import os

import torch

ENV_CHOICES = {"MUSE_SCAN": ("torch", "numba", "mamba_ssm"), "MUSE_CONV": ("torch", "causal_conv1d")}


def env_choice(var: str) -> str | None:
    """The forced backend named by environment variable `var` (see module docstring)."""
    value = os.environ.get(var, "").strip().lower()
    if value in ("", "auto"):
        return None
    allowed = ENV_CHOICES.get(var, ("torch", "numba", "mamba_ssm", "causal_conv1d"))
    if value not in allowed:
        raise ValueError(f"{var} must be one of {', '.join(allowed)} (or unset), got {value!r}")
    return value


def on_kernel_device(x: torch.Tensor) -> bool:
    """Whether x lives where the CUDA kernels can read it (tests patch this to run the dispatch on CPU)."""
    return x.is_cuda
