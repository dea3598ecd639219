"""seqTransf's initialisation from CLIP's text tower (spec section 6, CLIP4Clip modules/modeling.py).

With pretrained CLIP, CLIP4Clip's frame Transformer starts as CLIP's text Transformer layers
0..layers-1 and its frame position embeddings as the text `positional_embedding`. Which CLIP: the one
whose features the run trains on, named by the cache fingerprint (open_clip model name, pretrained
tag or file, weights identity). The plan is decided from the open_clip model CONFIG alone (no
weights), so the geometry it fixes (heads, activation) is known before anything is loaded.

Rule when it cannot be done:
- random-init CLIP: there is nothing to copy -> random init, recorded as such;
- the text tower does not fit (text width != embed dim D, fewer text positions than frames,
  another MLP ratio, layer scale): random init with the reason recorded;
- fewer text layers than seqTransf layers (only tiny test models): the text layers there are are
  copied and the rest stay random, as CLIP4Clip's own copy loop does; recorded;
- pretrained CLIP whose weights cannot be loaded or are not the cache's: a UserError (never a silent
  fallback that would change the recipe).
The two fallbacks for pretrained CLIP (misfit, fewer layers) are not the paper's recipe: the plan's
`warning` says so in one line, which `muse train` prints (random-init CLIP is a deliberate choice and
is only recorded).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from muse_pipeline.errors import UserError
from muse_pipeline.models.transformer import default_heads


class ClipWeightsError(UserError, ValueError):
    """The CLIP weights seqTransf must start from cannot be loaded, or are not the cache's."""


@dataclass(frozen=True)
class SeqTransfInit:
    """How a new seqTransf head starts. `copy` False = random init; `note` says why, in words."""

    copy: bool
    heads: int
    act: str  # "quick_gelu" | "gelu"
    note: str
    model: str | None = None  # open_clip model name of the source
    pretrained: str | None = None  # its tag or weights file
    weights: str | None = None  # its weights identity (tag or sha256)
    copied_layers: int = 0  # seqTransf layers 0..copied_layers-1 start as CLIP's text layers
    warning: str | None = None  # for the console: pretrained CLIP, yet (partly) random init

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_seqtransf_init(
    *,
    model_name: str,
    pretrained: str | None,
    weights_id: str,
    quick_gelu: bool,
    dim: int,
    layers: int,
    max_frames: int,
) -> SeqTransfInit:
    """Decide copy vs random init from the open_clip config of `model_name` (weights are not read)."""
    import open_clip
    from open_clip.model import CLIPTextCfg

    from muse_pipeline.encoders.clip import RANDOM_INIT, register_tiny_config

    def random(reason: str, warn: bool = False) -> SeqTransfInit:
        warning = f"seqTransf starts from random init, not CLIP's text layers: {reason}" if warn else None
        return SeqTransfInit(False, default_heads(dim), "quick_gelu", f"random init: {reason}", warning=warning)

    if weights_id == RANDOM_INIT or str(weights_id).startswith("random") or pretrained is None:
        return random(f"CLIP {model_name} is random-init (no pretrained text tower to copy); NOT CLIP4Clip's recipe")
    register_tiny_config()
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ClipWeightsError(f"open_clip does not know the model {model_name!r} named by the cache fingerprint")
    text = CLIPTextCfg(**config.get("text_cfg", {}))
    misfits = []
    if text.width != dim:
        misfits.append(f"text width {text.width} != embed dim {dim}")
    if text.context_length < max_frames:
        misfits.append(f"{text.context_length} text positions < {max_frames} frames")
    if float(text.mlp_ratio) != 4.0:
        misfits.append(f"text MLP ratio {text.mlp_ratio} != 4")
    if text.ls_init_value is not None:
        misfits.append("text layers use layer scale")
    if text.width % text.heads:
        misfits.append(f"text width {text.width} not divisible by {text.heads} heads")
    if misfits:
        return random(f"CLIP {model_name}'s text tower does not fit seqTransf ({'; '.join(misfits)})", warn=True)
    act = "quick_gelu" if quick_gelu else "gelu"
    copied = min(layers, text.layers)
    rest = "" if copied == layers else f" (only {text.layers} text layers: layers {copied}-{layers - 1} random)"
    note = (f"CLIP4Clip init: layers 0-{copied - 1} = {model_name} ({pretrained}) text Transformer layers "
            f"0-{copied - 1}{rest}, frame position embeddings = its positional_embedding[:{max_frames}], "
            f"{text.heads} heads, {act}")
    warning = None if copied == layers else (
        f"seqTransf layers {copied}-{layers - 1} start from random init: CLIP {model_name} has only {text.layers} "
        f"text layers to copy (CLIP4Clip copies {layers})")
    return SeqTransfInit(True, int(text.heads), act, note, model_name, str(pretrained), str(weights_id), copied,
                         warning)


def load_text_source(plan: SeqTransfInit) -> nn.Module:
    """The open_clip CLIP model to copy from (on the CPU); ClipWeightsError (one line naming the file
    and what to do) unless its weights are the ones the plan (i.e. the cache) names."""
    import os

    from muse_pipeline.encoders.clip import ClipEncoder, file_sha256

    source = plan.pretrained or ""
    digest = file_sha256(source) if os.path.isfile(source) else None
    if digest is not None and digest != plan.weights:
        # checked before loading: a file replaced after extraction (even by junk) is named as such
        raise ClipWeightsError(
            f"{source} is not the CLIP the cache was extracted with (sha256 {digest[:12]}... vs the "
            f"fingerprint's {str(plan.weights)[:12]}...): it changed after extraction; restore the original "
            "weights file, or train another head"
        )
    try:
        encoder = ClipEncoder(plan.model or "", pretrained=plan.pretrained, device="cpu")
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as exc:
        raise ClipWeightsError(
            f"seqTransf starts from CLIP's text tower, but {plan.model} weights {plan.pretrained!r} (from the cache "
            f"fingerprint) cannot be loaded: {exc}. Make the weights available again, or train another head."
        ) from exc
    if encoder.weights_id != plan.weights:
        raise ClipWeightsError(
            f"{plan.pretrained} is not the CLIP the cache was extracted with (weights {encoder.weights_id} vs "
            f"{plan.weights}); restore the original weights file"
        )
    return encoder.model


def init_seqtransf(head: nn.Module, plan: SeqTransfInit, clip_model: nn.Module | None = None) -> None:
    """Apply `plan` to a freshly built SeqTransfHead: copy CLIP's text layers when plan.copy."""
    if not plan.copy:
        return
    source = clip_model if clip_model is not None else load_text_source(plan)
    copied = head.load_clip_text(source)
    if copied != plan.copied_layers:
        raise ValueError(f"copied {copied} CLIP text layers into seqTransf, the plan said {plan.copied_layers}")
