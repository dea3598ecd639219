"""AdamW parameter groups: weight decay only where it belongs, per-prefix learning-rate multipliers.

Spec section 7: no weight decay on biases, norms, A_log, D and logit_scale; the fusion head and text
adapter train at 10x the base lr, CLIP towers (end-to-end mode) at 1e-3x.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# Multipliers matching spec section 7 for a RetrievalModel (optionally wrapped with a `clip.` tower).
DEFAULT_LR_MULT: dict[str, float] = {"head.": 10.0, "text_adapter.": 10.0, "clip.": 1e-3}


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm weights and every 0-/1-D tensor (D, logit_scale, ...), plus Mamba's A_log."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim < 2 or leaf in {"A_log", "D", "logit_scale"} or "norm" in name.lower()


def lr_multiplier(name: str, lr_mult: dict[str, float]) -> float:
    """The multiplier of the LONGEST matching prefix, 1.0 when none matches."""
    best, mult = -1, 1.0
    for prefix, m in lr_mult.items():
        if name.startswith(prefix) and len(prefix) > best:
            best, mult = len(prefix), float(m)
    return mult


def param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    lr_mult: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Split the trainable parameters of `model` into optimizer groups.

    One group per (lr multiplier, decay/no-decay) pair that has parameters; each dict carries
    `params`, `lr`, `weight_decay`, plus `name` (e.g. "x10.0/no_decay") and `param_names` for
    logging. Frozen parameters (requires_grad False) are left out.
    """
    if base_lr <= 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    lr_mult = dict(lr_mult or {})
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = lr_multiplier(name, lr_mult)
        no_decay = is_no_decay(name, p)
        key = (mult, no_decay)
        if key not in groups:
            groups[key] = {
                "name": f"x{mult:g}/{'no_decay' if no_decay else 'decay'}",
                "params": [],
                "param_names": [],
                "lr": base_lr * mult,
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], k[1]))]
