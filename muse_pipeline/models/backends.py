"""Which selective-scan / causal-conv implementation a device gets, and what to say when it is slow.

On CUDA the fused kernels (the `cuda` extra: mamba-ssm, causal-conv1d) are ~40x faster per training
step than the pure-torch scan (~30 ms against ~1.2 s estimated at the paper's size), so running
without them is allowed but announced, recorded in the run's config.json, and refused with
`--require-kernels`.
"""

from __future__ import annotations

import logging

import torch

from muse_pipeline.errors import UserError

log = logging.getLogger(__name__)


class KernelsMissing(UserError, RuntimeError):
    """`--require-kernels` on a device that would run the pure-torch scan."""


def kernel_backends(device: torch.device | str) -> dict[str, str]:
    """{"scan": ..., "conv": ..., "mixer": ..., "device": "cuda" | "cpu" | ...}: the implementations that
    float32 tensors on `device` dispatch to ("device" is "cuda" wherever the CUDA dispatch applies;
    "mixer" is "fused-cpu" where BiMamba runs as `bimamba_cpu`'s single autograd Function, else
    "autograd")."""
    from muse_pipeline.models import dispatch, scan
    from muse_pipeline.models.conv import conv_backend

    probe = torch.empty(0, device=device)
    kind = "cuda" if dispatch.on_kernel_device(probe) else probe.device.type
    scan_name = scan.scan_backend(probe)
    mixer = "fused-cpu" if kind == "cpu" and scan_name == "numba" else "autograd"
    return {"scan": scan_name, "conv": conv_backend(probe), "mixer": mixer, "device": kind}


def check_kernels(device: torch.device | str, require: bool = False, warn: bool = True) -> dict[str, str]:
    """Report the backends for `device`; on CUDA without the kernels warn (if `warn`) or raise
    KernelsMissing when `require`. Returns kernel_backends(device)."""
    backends = kernel_backends(device)
    if backends["device"] != "cuda":
        if require:
            raise KernelsMissing(
                f"--require-kernels needs a CUDA device, but this run uses {device}; drop the option "
                "or train on a GPU"
            )
        return backends
    missing = [name for name, pkg in (("scan", "mamba_ssm"), ("conv", "causal_conv1d")) if backends[name] != pkg]
    if missing:
        what = " and ".join(f"the {name} ({backends[name]})" for name in missing)
        message = (
            f"CUDA is available but {what} will run in plain PyTorch, not the fused CUDA kernels: "
            "MUSE training will be many times slower (about 1.2 s instead of ~30 ms per step at the "
            "paper's size). Install them with `pip install -e '.[cuda]' --no-build-isolation`"
        )
        if require:
            raise KernelsMissing(f"{message}, or drop --require-kernels")
        if warn:
            log.warning("%s (or pass --require-kernels to make this an error).", message)
    return backends
