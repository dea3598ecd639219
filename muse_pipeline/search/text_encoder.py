"""CLIP's text tower alone, in plain torch: what a query needs, without open_clip or the image tower.

A query runs the text tower of the CLIP the cache was made with. Building it through open_clip
costs the package import (its model zoo, torchvision) and the whole model, image tower included:
seconds before the first answer. `muse index` therefore exports the text tower once per index root,
and a query loads only that:

```
INDEX_ROOT/text-encoder/
  weights.safetensors   open_clip's own tensor names and shapes (W width, C context, V vocab, D embed):
                        token_embedding.weight [V, W], positional_embedding [C, W],
                        transformer.resblocks.{i}.{ln_1,ln_2}.{weight,bias} [W],
                        .attn.in_proj_weight [3W, W], .attn.in_proj_bias [3W],
                        .attn.out_proj.{weight [W, W], bias [W]},
                        .mlp.c_fc.{weight [M, W], bias [M]}, .mlp.c_proj.{weight [W, M], bias [W]},
                        ln_final.{weight,bias} [W], text_projection [W, D]   (float32)
  config.json           format = TEXT_ENCODER_FORMAT, format_version, and the `TextEncoderConfig`
                        fields (widths, heads, layers, context length, vocab, activation, layer-norm
                        eps, tokenizer cleaning, open_clip model name, weights id)
```

The forward is open_clip's `encode_text` for the standard CLIP text tower (pre-norm residual
blocks, causal attention, GELU or QuickGELU MLP, `ln_final`, the `<eot>` position = the argmax id,
times `text_projection`), written as plain tensor operations over the loaded weights: no module is
built and nothing is initialised. Only the first W positions of ids [M, W] run: with the causal
mask nothing after `<eot>` reaches it, so the result equals `encode_text` of the ids zero-padded
to the context length (as `ClipEncoder.encode_texts`). tests/test_search_text_encoder.py checks it
against open_clip's `encode_text`.

- `export_text_encoder(clip_model, folder, model_name=, weights_id=)`: write the folder (build side;
  refuses towers of another layout with `UnsupportedModelError`).
- `TextEncoder.load(folder)`: read it; `.tokenize(texts, words)`, `.encode_texts(ids)` as ClipEncoder's.
- `find_text_encoder(index_path, clip)`: the export serving an index of this CLIP record, or None
  (an index built before exports existed: the caller falls back to open_clip).
- `ensure_text_encoder(root, clip, pretrained)`: export the index's CLIP once per index root.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from muse_pipeline.atomic import atomic_write_json, read_json
from muse_pipeline.errors import UserError
from muse_pipeline.search.clip_tokenizer import ClipTokenizer

TEXT_ENCODER_DIR = "text-encoder"
TEXT_ENCODER_FORMAT = "muse-text-encoder"
TEXT_ENCODER_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
ACTIVATIONS = ("gelu", "quick_gelu")
# Probe texts run through both towers after an export (a wrong export is a bug, caught at build time).
EXPORT_PROBES = ("a red circle moves left", "", "two people talk in a kitchen while a dog sleeps " * 8)


class TextEncoderError(UserError, ValueError):
    """An exported text tower that cannot be read (damaged or of another format); rebuild the index."""


@dataclass(frozen=True)
class TextEncoderConfig:
    """The exported tower's geometry and identity (config.json without its format keys)."""

    model_name: str  # the open_clip model name, e.g. "ViT-B-32"
    weights_id: str  # the CLIP weights identity (open_clip tag, sha256 of a file, or "random-init")
    width: int  # W, the transformer width
    heads: int
    layers: int
    mlp_width: int  # M
    context_length: int  # C, positions of the positional embedding
    vocab_size: int  # V
    embed_dim: int  # D, the output width
    activation: str  # one of ACTIVATIONS: "gelu" (erf) or "quick_gelu" (x * sigmoid(1.702 x))
    ln_eps: float
    tokenizer_clean: str = "lower"  # open_clip's tokenizer `clean` (text normalisation)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of weights.safetensors and its shape."""
        w, m = self.width, self.mlp_width
        shapes: dict[str, tuple[int, ...]] = {
            "token_embedding.weight": (self.vocab_size, w),
            "positional_embedding": (self.context_length, w),
            "ln_final.weight": (w,), "ln_final.bias": (w,),
            "text_projection": (w, self.embed_dim),
        }
        for i in range(self.layers):
            p = f"transformer.resblocks.{i}."
            shapes.update({
                p + "ln_1.weight": (w,), p + "ln_1.bias": (w,), p + "ln_2.weight": (w,), p + "ln_2.bias": (w,),
                p + "attn.in_proj_weight": (3 * w, w), p + "attn.in_proj_bias": (3 * w,),
                p + "attn.out_proj.weight": (w, w), p + "attn.out_proj.bias": (w,),
                p + "mlp.c_fc.weight": (m, w), p + "mlp.c_fc.bias": (m,),
                p + "mlp.c_proj.weight": (w, m), p + "mlp.c_proj.bias": (w,),
            })
        return shapes


def _activation_name(module: torch.nn.Module) -> str:
    name = type(module).__name__
    if name == "QuickGELU":
        return "quick_gelu"
    if isinstance(module, torch.nn.GELU) and module.approximate == "none":
        return "gelu"
    from muse_pipeline.encoders.clip import UnsupportedModelError

    raise UnsupportedModelError(f"text tower activation {module!r} is neither GELU nor QuickGELU")


def text_tower_config(clip_model: Any, model_name: str, weights_id: str,
                      tokenizer_clean: str = "lower") -> TextEncoderConfig:
    """The TextEncoderConfig of an open_clip CLIP model's text tower; UnsupportedModelError for a tower
    this module does not reproduce (layer scale, cross attention, no causal mask, a non-argmax pooling,
    a Linear projection, another block type)."""
    from muse_pipeline.encoders.clip import UnsupportedModelError

    def refuse(why: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{model_name}: cannot export its text tower ({why})")

    blocks = list(getattr(getattr(clip_model, "transformer", None), "resblocks", []))
    if not blocks or any(type(b).__name__ != "ResidualAttentionBlock" for b in blocks):
        raise refuse("not a stack of open_clip ResidualAttentionBlocks")
    if getattr(clip_model, "text_pool_type", "argmax") != "argmax":
        raise refuse(f"text pooling {clip_model.text_pool_type!r}, only 'argmax'")
    if not isinstance(clip_model.text_projection, torch.Tensor) or isinstance(clip_model.text_projection,
                                                                              torch.nn.Linear):
        raise refuse("its text projection is not a matrix")
    mask = clip_model.attn_mask
    n = clip_model.positional_embedding.shape[0]
    causal = torch.full((n, n), float("-inf")).triu_(1)
    if mask is None or not torch.equal(mask.float().cpu(), causal):
        raise refuse("its attention mask is not causal")
    activations = set()
    for b in blocks:
        if not isinstance(b.ls_1, torch.nn.Identity) or not isinstance(b.ls_2, torch.nn.Identity):
            raise refuse("layer scale")
        if hasattr(b, "ln_1_kv"):
            raise refuse("cross attention")
        if not b.attn._qkv_same_embed_dim or b.attn.in_proj_bias is None or b.attn.bias_k is not None:
            raise refuse("an attention layout other than one biased qkv projection")
        activations.add(_activation_name(b.mlp.gelu))
    if len(activations) != 1:
        raise refuse("mixed activations")
    ln_eps = {float(m.eps) for b in blocks for m in (b.ln_1, b.ln_2)} | {float(clip_model.ln_final.eps)}
    if len(ln_eps) != 1:
        raise refuse("mixed layer-norm eps")
    width = int(clip_model.positional_embedding.shape[1])
    return TextEncoderConfig(
        model_name=model_name, weights_id=weights_id, width=width, heads=int(blocks[0].attn.num_heads),
        layers=len(blocks), mlp_width=int(blocks[0].mlp.c_fc.weight.shape[0]), context_length=int(n),
        vocab_size=int(clip_model.token_embedding.weight.shape[0]),
        embed_dim=int(clip_model.text_projection.shape[1]), activation=activations.pop(),
        ln_eps=ln_eps.pop(), tokenizer_clean=tokenizer_clean,
    )


def export_text_encoder(clip_model: Any, folder: Path | str, *, model_name: str, weights_id: str,
                        tokenizer_clean: str = "lower") -> Path:
    """Write `folder` (weights.safetensors + config.json, the module docstring's format) from an open_clip
    CLIP model's text tower, then check that the loaded export reproduces the model's `encode_text`
    on EXPORT_PROBES (a RuntimeError, a bug, if not).

    The folder is written beside under a temporary name and renamed into place; an existing folder
    is replaced (a reader of it falls back to open_clip while it is briefly absent). Returns `folder`.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    config = text_tower_config(clip_model, model_name, weights_id, tokenizer_clean)
    state = clip_model.state_dict()
    tensors = {name: state[name].detach().to("cpu", torch.float32).contiguous() for name in config.weight_shapes()}
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        atomic_write_json(tmp / CONFIG_FILE, {"format": TEXT_ENCODER_FORMAT, "format_version": TEXT_ENCODER_VERSION,
                                              **asdict(config)})
        for name in (WEIGHTS_FILE, CONFIG_FILE):  # readable like the index's other files (a server may run as another user)
            (tmp / name).chmod(0o644)
        _check_export(TextEncoder.load(tmp), clip_model)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _check_export(encoder: TextEncoder, clip_model: Any) -> None:
    ids = encoder.tokenize(list(EXPORT_PROBES), encoder.config.context_length)
    device = clip_model.token_embedding.weight.device
    with torch.inference_mode():
        want = clip_model.encode_text(torch.from_numpy(ids).long().to(device)).float().cpu()
    got = encoder.encode_texts(ids)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
        raise RuntimeError(f"the exported text tower of {encoder.config.model_name} differs from open_clip's "
                           f"encode_text (max |diff| {float((got - want).abs().max()):.3g})")


class TextEncoder:
    """An exported CLIP text tower: texts -> ids -> [M, D] embeddings (= open_clip `encode_text`).

    `config`: TextEncoderConfig; `weights`: name -> float32 tensor on `device`; `model_name` and
    `weights_id` as ClipEncoder's.
    """

    def __init__(self, config: TextEncoderConfig, weights: dict[str, torch.Tensor], device: str = "cpu") -> None:
        if config.activation not in ACTIVATIONS:
            raise TextEncoderError(f"unknown activation {config.activation!r} in an exported text tower; "
                                   "rebuild the index")
        want = config.weight_shapes()
        got = {k: tuple(v.shape) for k, v in weights.items()}
        if got != want:
            bad = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
            raise TextEncoderError(f"the exported text tower's weights do not match its config.json "
                                   f"({', '.join(bad[:3])}); rebuild the index")
        self.config = config
        self.device = torch.device(device)
        self.weights = {k: v.to(self.device, torch.float32) for k, v in weights.items()}
        self.model_name = config.model_name
        self.weights_id = config.weights_id
        self.dim = config.embed_dim
        self.context_length = config.context_length
        self.tokenizer = ClipTokenizer(config.context_length, config.tokenizer_clean)
        if self.tokenizer.vocab_size != config.vocab_size or self.tokenizer.eot_id != config.vocab_size - 1:
            # argmax pooling finds <eot> only because it is the largest id
            raise TextEncoderError(f"the exported text tower has {config.vocab_size} token ids, CLIP's BPE "
                                   f"{self.tokenizer.vocab_size} with <eot> last; rebuild the index")

    @classmethod
    def load(cls, folder: Path | str, device: str = "cpu") -> TextEncoder:
        """Read an export (TextEncoderError if damaged or of another format)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = read_json(folder / CONFIG_FILE, None)
        if not isinstance(meta, dict) or meta.get("format") != TEXT_ENCODER_FORMAT \
                or meta.get("format_version") != TEXT_ENCODER_VERSION:
            raise TextEncoderError(f"{folder} is not an exported text tower of version {TEXT_ENCODER_VERSION}; "
                                   "rebuild the index")
        names = {f.name for f in fields(TextEncoderConfig)}
        try:
            config = TextEncoderConfig(**{k: v for k, v in meta.items() if k in names})
            weights = load_file(str(folder / WEIGHTS_FILE), device="cpu")
        except (TypeError, OSError, SafetensorError) as exc:
            raise TextEncoderError(f"cannot read the exported text tower {folder} ({type(exc).__name__}: "
                                   f"{str(exc)[:120]}); rebuild the index") from None
        return cls(config, weights, device)

    def tokenize(self, texts: Sequence[str] | str, max_words: int) -> np.ndarray:
        """texts (M) -> int32 [M, W]: `<sot>` + bpe[:W-2] + `<eot>`, zero padded (= ClipEncoder.tokenize)."""
        return self.tokenizer.tokenize(texts, max_words)

    def text_features(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [M, W] (W <= context length, each row with its `<eot>`) -> [M, D] on the encoder's device."""
        cfg, p = self.config, self.weights
        if ids.ndim != 2 or not 1 <= ids.shape[1] <= cfg.context_length:
            raise ValueError(f"expected token ids [M, W] with W <= {cfg.context_length}, got {tuple(ids.shape)}")
        ids = ids.to(self.device, torch.long)
        m, w = ids.shape
        width, heads = cfg.width, cfg.heads
        eps = cfg.ln_eps
        x = F.embedding(ids, p["token_embedding.weight"]) + p["positional_embedding"][:w]
        causal = torch.full((w, w), float("-inf"), device=self.device).triu_(1)
        for i in range(cfg.layers):
            b = f"transformer.resblocks.{i}."
            h = F.layer_norm(x, (width,), p[b + "ln_1.weight"], p[b + "ln_1.bias"], eps)
            q, k, v = F.linear(h, p[b + "attn.in_proj_weight"], p[b + "attn.in_proj_bias"]).chunk(3, dim=-1)
            q, k, v = (t.reshape(m, w, heads, width // heads).transpose(1, 2) for t in (q, k, v))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
            a = a.transpose(1, 2).reshape(m, w, width)
            x = x + F.linear(a, p[b + "attn.out_proj.weight"], p[b + "attn.out_proj.bias"])
            h = F.layer_norm(x, (width,), p[b + "ln_2.weight"], p[b + "ln_2.bias"], eps)
            h = F.linear(h, p[b + "mlp.c_fc.weight"], p[b + "mlp.c_fc.bias"])
            h = h * torch.sigmoid(1.702 * h) if cfg.activation == "quick_gelu" else F.gelu(h)
            x = x + F.linear(h, p[b + "mlp.c_proj.weight"], p[b + "mlp.c_proj.bias"])
        x = F.layer_norm(x, (width,), p["ln_final.weight"], p["ln_final.bias"], eps)
        x = x[torch.arange(m, device=self.device), ids.argmax(dim=-1)]
        return x @ p["text_projection"]

    def encode_texts(self, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """ids int [M, W] -> float32 [M, D] on the CPU (no grad), = open_clip `encode_text` unnormalised."""
        with torch.inference_mode():
            ids_t = ids if torch.is_tensor(ids) else torch.from_numpy(np.asarray(ids))
            return self.text_features(ids_t).float().cpu()


def text_encoder_folders(index_path: Path | str) -> list[Path]:
    """Where an index's export may be: in the index folder (a flat index is its own root) or beside
    it (a generation folder inside an index root)."""
    path = Path(index_path)
    return [path / TEXT_ENCODER_DIR, path.parent / TEXT_ENCODER_DIR]


def export_matches(folder: Path, clip: dict[str, Any]) -> bool:
    """Whether `folder` holds an export of the CLIP of index.json's `clip` record (model, weights_id)."""
    meta = read_json(folder / CONFIG_FILE, None)
    return (isinstance(meta, dict) and meta.get("format") == TEXT_ENCODER_FORMAT
            and meta.get("model_name") == clip.get("model") and meta.get("weights_id") == clip.get("weights_id")
            and (folder / WEIGHTS_FILE).is_file())


def find_text_encoder(index_path: Path | str, clip: dict[str, Any]) -> Path | None:
    """The export that serves the index at `index_path` (its `clip` record: model, weights_id), or None."""
    return next((f for f in text_encoder_folders(index_path) if export_matches(f, clip)), None)


def ensure_text_encoder(root: Path | str, clip: dict[str, Any], pretrained: str | None = None,
                        device: str = "cpu") -> Path:
    """`root/text-encoder`, exported from the index's CLIP (`clip` record, as `query.clip_source`
    resolves it) unless it already holds this CLIP's export. Builds the CLIP model through open_clip."""
    from muse_pipeline.encoders.clip import ClipEncoder
    from muse_pipeline.search.query import clip_source

    folder = Path(root) / TEXT_ENCODER_DIR
    if export_matches(folder, clip):
        return folder
    override = pretrained if pretrained is not None and os.path.isfile(pretrained) else None  # a tag is the record's
    encoder = ClipEncoder(clip["model"], pretrained=clip_source(clip, Path(root), override), device=device)
    if encoder.weights_id != clip["weights_id"]:
        raise TextEncoderError(f"CLIP weights {encoder.weights_id!r} differ from the index's {clip['weights_id']!r}; "
                               "pass the right --pretrained")
    import open_clip

    clean = (open_clip.get_model_config(clip["model"]) or {}).get("text_cfg", {}).get(
        "tokenizer_kwargs", {}).get("clean", "lower")
    return export_text_encoder(encoder.model, folder, model_name=clip["model"], weights_id=clip["weights_id"],
                               tokenizer_clean=clean)
