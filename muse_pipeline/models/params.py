"""AdamW parameter groups: weight decay only where it belongs, per-prefix learning-rate multipliers.

Spec sections 6-7: no weight decay on biases, norms, A_log, D and logit_scale; the fusion head and
text adapter train at 10x the base lr, seqTransf at the base lr (CLIP4Clip), and CLIP's parameters at
the CLIP lr (1e-7 = 1e-3x): the towers in end-to-end mode and, always, `logit_scale`, which is CLIP's
own temperature (so it stays effectively fixed, as in CLIP4Clip and MUSE).
"""

from __future__ import annotations

from typing import Any

from torch import nn

# Multipliers matching spec section 7 for a bare RetrievalModel with a fusion head.
DEFAULT_LR_MULT: dict[str, float] = {"head.": 10.0, "text_adapter.": 10.0, "logit_scale": 1e-3, "clip.": 1e-3}


def recipe_lr_mult(
    *, lr: float, head_lr_mult: float, clip_lr: float, head_lr_group: str = "fusion", prefix: str = "model."
) -> dict[str, float]:
    """The multipliers of spec sections 6-7 for a RetrievalModel at `prefix` (and a `clip.` tower).

    head_lr_group: the head's `LR_GROUP`, "fusion" (x head_lr_mult) or "base" (x1, seqTransf)."""
    if head_lr_group not in ("fusion", "base"):
        raise ValueError(f"head_lr_group must be 'fusion' or 'base', got {head_lr_group!r}")
    clip_mult = clip_lr / lr
    return {
        f"{prefix}head.": head_lr_mult if head_lr_group == "fusion" else 1.0,
        f"{prefix}text_adapter.": head_lr_mult,
        f"{prefix}logit_scale": clip_mult,
        "clip.": clip_mult,
    }


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm weights and every 0-/1-D tensor (D, logit_scale, ...), plus Mamba's A_log."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim < 2 or leaf in {"A_log", "D", "logit_scale"} or "norm" in name.lower()


def matching_prefix(name: str, lr_mult: dict[str, float]) -> str:
    """The LONGEST prefix of `lr_mult` that `name` starts with, "" when none does."""
    best = ""
    for prefix in lr_mult:
        if name.startswith(prefix) and len(prefix) > len(best):
            best = prefix
    return best


def lr_multiplier(name: str, lr_mult: dict[str, float]) -> float:
    """The multiplier of the LONGEST matching prefix, 1.0 when none matches."""
    prefix = matching_prefix(name, lr_mult)
    return float(lr_mult[prefix]) if prefix else 1.0


def param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    lr_mult: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Split the trainable parameters of `model` into optimizer groups.

    One group per (matching prefix, decay/no-decay) pair that has parameters; each dict carries
    `params`, `lr`, `weight_decay`, plus `name` (e.g. "model.head/no_decay", "base/decay" for
    parameters no prefix matches) and `param_names` for logging. Frozen parameters (requires_grad
    False) are left out. Groups come out by decreasing lr, then name.
    """
    if base_lr <= 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    lr_mult = dict(lr_mult or {})
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        prefix = matching_prefix(name, lr_mult)
        mult = float(lr_mult[prefix]) if prefix else 1.0
        no_decay = is_no_decay(name, p)
        key = (prefix, no_decay)
        if key not in groups:
            groups[key] = {
                "name": f"{prefix.rstrip('.') or 'base'}/{'no_decay' if no_decay else 'decay'}",
                "params": [],
                "param_names": [],
                "lr": base_lr * mult,
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return sorted(groups.values(), key=lambda g: (-g["lr"], g["name"]))


def param_table(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per parameter of `param_groups` output: name, shape, group, lr, weight decay."""
    rows = []
    for g in groups:
        for name, p in zip(g["param_names"], g["params"], strict=True):
            rows.append({"name": name, "shape": list(p.shape), "group": g["name"], "lr": g["lr"],
                         "weight_decay": g["weight_decay"]})
    return sorted(rows, key=lambda r: r["name"])
