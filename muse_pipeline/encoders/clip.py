"""Frozen CLIP towers that produce what the feature cache stores (MUSE_SPEC section 2).

Per frame: the last vision transformer layer's output for ALL tokens (CLS + patch grid), after
`ln_post`, times `visual.proj` -> [L, D]; row 0 is exactly open_clip's `encode_image`.
Per caption: CLIP BPE ids (`<sot>` + bpe[:W-2] + `<eot>`, zero padded) and the EOT embedding
(after `ln_final`, at the argmax position, times `text_projection`) = open_clip's `encode_text`.

Only the standard open_clip ViT CLIP layout is supported (class token pooling, `ln_post` before
pooling, a projection matrix, argmax text pooling, the BPE tokenizer); anything else is refused
with `UnsupportedModelError` instead of caching features of a different meaning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import QuickGELU, VisionTransformer

from muse_pipeline.encoders.weights_file import (
    WeightsFile,
    WeightsFileError,
    check_readable,
    identify,
    torchscript_state_dict,
)
from muse_pipeline.encoders.weights_identity import RANDOM_INIT, file_sha256
from muse_pipeline.errors import InputError, UserError
from muse_pipeline.search.clip_tokenizer import frame_ids

# Directory with this package's open_clip model configs (`muse-tiny`, `muse-tiny-16`).
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
TINY_MODEL = "muse-tiny"
# Random initialisation is seeded so that every process (e.g. each extraction worker) that builds
# the same model name with `pretrained=None` gets the same weights: the cache fingerprint says
# "random-init" and that must name one set of weights.
RANDOM_INIT_SEED = 0
# Inference precisions of the frozen towers; "auto": float16 on CUDA (tensor cores), float32 on CPU.
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UnsupportedModelError(UserError, ValueError):
    """The open_clip model is not a standard ViT CLIP whose tokens this module knows how to read."""


log = logging.getLogger(__name__)


class _NoRandomInitWarning(logging.Filter):
    """open_clip warns on the root logger that a model without weights is randomly initialised:
    with `pretrained=None` that is the request (and the fingerprint says "random-init")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


class WeightsNotFound(InputError, FileNotFoundError):
    """`pretrained` looks like a file path but there is no such file."""


def register_tiny_config() -> None:
    """Register this package's tiny open_clip configs (`muse-tiny`: ViT, 224 px, patch 32 -> 7x7 grid,
    width 64, 2 layers, embed dim 64; `muse-tiny-16`: the same with patch 16 -> 14x14 grid).

    Idempotent; uses open_clip's public `add_model_config`. Random init only: no download.
    """
    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz"))


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """"auto" -> "fp16" on CUDA, "fp32" elsewhere; other names are checked against PRECISIONS."""
    if precision == "auto":
        return "fp16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of: auto, {', '.join(PRECISIONS)}")
    return precision


def check_model_name(model_name: str) -> None:
    """InputError unless open_clip (with this package's tiny configs) knows `model_name`."""
    register_tiny_config()
    if model_name not in open_clip.list_models():
        raise InputError(
            f"unknown open_clip model {model_name!r}; known include: "
            f"{', '.join(m for m in open_clip.list_models() if m.startswith(('ViT-B', 'muse')))}, ..."
        )


def check_pretrained(model_name: str, pretrained: str | None) -> None:
    """InputError unless `pretrained` is None, an open_clip tag of the model, or a readable weights
    file (a torch checkpoint, safetensors or a TorchScript archive; read lazily, so a large file costs
    no full load)."""
    if pretrained is None:
        return
    if os.path.isdir(pretrained):
        raise InputError(f"--pretrained {pretrained} is a folder; give a weights file or a pretrained tag")
    if os.path.isfile(pretrained):
        check_readable(pretrained)
        return
    if _looks_like_path(pretrained):
        raise WeightsNotFound(f"pretrained weights file not found: {pretrained}")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        raise InputError(
            f"{pretrained!r} is neither a file nor a pretrained tag of {model_name}; "
            f"tags: {', '.join(tags) or '(none)'}"
        )


def _load_archive(model: torch.nn.Module, path: str) -> None:
    """Load a TorchScript archive's tensors into `model` (all of them, nothing missing). Entries that
    are the model's non-persistent buffers (open_clip's `attn_mask`, rebuilt by the model) are skipped."""
    state = torchscript_state_dict(path)
    expected = model.state_dict()
    buffers = dict(model.named_buffers())
    for name in [k for k in state if k not in expected and k in buffers]:
        del state[name]
    if "logit_scale" in state and state["logit_scale"].ndim != expected["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(expected["logit_scale"].shape)
    model.load_state_dict(state, strict=True)


def _weights_error(path: str, model_name: str, err: BaseException) -> InputError:
    """The one line for a weights file that cannot be loaded into `model_name`: not weights at all
    (junk, truncated), or weights of another model."""
    try:
        check_readable(path)
    except WeightsFileError as unreadable:
        return unreadable
    first = " ".join(str(err).split())[:160]
    return WeightsFileError(
        f"--pretrained {path} does not hold {model_name} weights open_clip can load "
        f"({type(err).__name__}: {first}); give the weights file of {model_name} (or the --model it was trained as)"
    )


class ClipEncoder:
    """A frozen open_clip CLIP model in eval mode.

    `pretrained`: None (random init, seeded), an open_clip tag such as "openai" (downloaded by
    open_clip where there is internet), or a local weights file (`weights_id` = its sha256).
    Geometry (image size, grid, L, D) and normalisation (mean, std) are read from the model.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        precision: str = "fp32",
    ) -> None:
        check_model_name(model_name)
        self.model_name = model_name
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self._pinned: torch.Tensor | None = None  # reused host buffer for CUDA uploads
        kwargs: dict[str, Any] = {}
        config_quick_gelu = bool((open_clip.get_model_config(model_name) or {}).get("quick_gelu", False))
        self.weights_file: WeightsFile | None = None
        if pretrained is None:
            self.weights_id = RANDOM_INIT
            source = None
            self.activation_reason = "random init: the model config's activation"
        elif os.path.isfile(pretrained):
            source = os.fspath(pretrained)
            check_readable(source)  # junk is one error line here, before open_clip's loader sees it
            self.weights_id = file_sha256(source)
            self.weights_file = identify(source, self.weights_id)
            kwargs.update(self._file_activation(self.weights_file, config_quick_gelu))
        elif isinstance(pretrained, str) and not _looks_like_path(pretrained):
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if pretrained not in tags:
                raise InputError(
                    f"{pretrained!r} is neither a file nor a pretrained tag of {model_name}; "
                    f"tags: {', '.join(tags) or '(none)'}"
                )
            source = pretrained
            self.weights_id = pretrained
            self.activation_reason = f"open_clip's pretrained tag {pretrained!r}"
            # OpenAI's weights were trained with QuickGELU: build the matching activation, else the
            # features silently differ from the published model.
            if open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False):
                kwargs["force_quick_gelu"] = True
        else:
            raise WeightsNotFound(f"pretrained weights file not found: {pretrained}")

        archive = self.weights_file is not None and self.weights_file.format == "torchscript"
        quiet = _NoRandomInitWarning() if source is None or archive else None  # weights come later
        root_logger = logging.getLogger()
        if quiet is not None:
            root_logger.addFilter(quiet)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            try:
                model = open_clip.create_model(model_name, pretrained=None if archive else source,
                                               device=self.device, **kwargs)
                if archive:
                    _load_archive(model, source)
            except WeightsFileError:
                raise
            except Exception as err:  # noqa: BLE001  sorted below: a user's file, or a bug
                if source is None or not os.path.isfile(source):
                    raise
                # a file that is not (these) weights: a user's mistake, not a bug
                raise _weights_error(source, model_name, err) from err
            finally:
                if quiet is not None:
                    root_logger.removeFilter(quiet)
        # CLIP's own temperature as the checkpoint has it (before any cast): the retrieval heads start
        # from it (spec section 7).
        self.logit_scale = float(model.logit_scale.detach().float().reshape(-1)[0])
        if self.precision != "fp32":
            model = model.to(PRECISIONS[self.precision])
        # what was BUILT, not what was asked for: the activation the cached features come from
        self.quick_gelu = any(isinstance(m, QuickGELU) for m in model.modules())
        if self.weights_file is not None and self.quick_gelu and not config_quick_gelu:
            log.info("--pretrained %s: %s; %s built with QuickGELU", source, self.weights_file.reason, model_name)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self._check_supported()

        visual: VisionTransformer = model.visual
        size = visual.image_size
        if isinstance(size, tuple | list):
            if size[0] != size[1]:
                raise UnsupportedModelError(f"{model_name}: non-square image size {size} is not supported")
            size = size[0]
        gh, gw = visual.grid_size
        if gh != gw:
            raise UnsupportedModelError(
                f"{model_name}: non-square patch grid {visual.grid_size} is not supported"
            )
        self.image_size = int(size)
        self.grid = int(gh)
        self.num_tokens = 1 + self.grid * self.grid
        self.dim = int(visual.proj.shape[1])
        if int(model.text_projection.shape[1]) != self.dim:
            raise UnsupportedModelError(f"{model_name}: text and image embedding widths differ")
        pp = open_clip.get_model_preprocess_cfg(model)
        self.mean = tuple(float(m) for m in pp["mean"])
        self.std = tuple(float(s) for s in pp["std"])
        self.context_length = int(model.context_length)

        tokenizer = open_clip.get_tokenizer(model_name)
        if not isinstance(tokenizer, SimpleTokenizer):
            raise UnsupportedModelError(
                f"{model_name}: tokenizer {type(tokenizer).__name__} is not CLIP's BPE tokenizer"
            )
        self.tokenizer = tokenizer
        self.sot_id = int(tokenizer.sot_token_id)
        self.eot_id = int(tokenizer.eot_token_id)
        if self.eot_id != max(self.sot_id, self.eot_id, tokenizer.vocab_size - 1):
            # argmax pooling finds <eot> only because it is the largest id.
            raise UnsupportedModelError(f"{model_name}: <eot> is not the largest token id")

    def _file_activation(self, weights: WeightsFile, config_quick_gelu: bool) -> dict[str, Any]:
        """open_clip kwargs for a weights FILE: QuickGELU where the file says so (OpenAI's weights in a
        GELU config would change every feature without an error); InputError on a contradiction."""
        if weights.quick_gelu is None:
            self.activation_reason = f"{self.model_name}'s config ({weights.reason})"
            return {}
        self.activation_reason = weights.reason
        if weights.quick_gelu:
            return {} if config_quick_gelu else {"force_quick_gelu": True}
        if config_quick_gelu:
            plain = self.model_name.removesuffix("-quickgelu")
            raise InputError(
                f"--pretrained {weights.path} is a {weights.reason}, but {self.model_name} builds QuickGELU; "
                f"use --model {plain}"
            )
        return {}

    def _check_supported(self) -> None:
        model, name = self.model, self.model_name
        if type(model) is not open_clip.CLIP:
            raise UnsupportedModelError(f"{name}: {type(model).__name__} is not a plain open_clip CLIP model")
        v = model.visual
        if not isinstance(v, VisionTransformer):
            raise UnsupportedModelError(f"{name}: vision tower {type(v).__name__} is not a VisionTransformer")
        if v.attn_pool is not None:
            raise UnsupportedModelError(f"{name}: attentional pooling has no per-token CLIP features")
        if v.pool_type != "tok":
            raise UnsupportedModelError(f"{name}: pool_type {v.pool_type!r} (only class-token pooling 'tok')")
        if v.final_ln_after_pool:
            raise UnsupportedModelError(f"{name}: final_ln_after_pool applies ln_post after pooling only")
        if v.proj is None:
            raise UnsupportedModelError(f"{name}: vision tower has no projection")
        if model.text_pool_type != "argmax" or model.text_projection is None:
            raise UnsupportedModelError(f"{name}: text pooling {model.text_pool_type!r} (only 'argmax')")
        if isinstance(model.text_projection, torch.nn.Linear):
            raise UnsupportedModelError(f"{name}: linear-layer text projection is not supported")

    def describe(self) -> dict[str, Any]:
        """What determines the cached features (goes into the cache fingerprint)."""
        return {
            "model_name": self.model_name,
            "weights_id": self.weights_id,
            "quick_gelu": self.quick_gelu,
            "clip_activation": "quick_gelu" if self.quick_gelu else "gelu",
            "logit_scale": self.logit_scale,  # CLIP's temperature (log) in these weights
            "image_size": self.image_size,
            "grid": self.grid,
            "num_tokens": self.num_tokens,
            "dim": self.dim,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    # ----------------------------------------------------------------------------------- vision
    def frame_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, S, S] normalised -> tokens [N, L, D] on the model's device, differentiable.

        Mirrors open_clip's VisionTransformer forward up to `ln_post`, keeps every token and projects
        all of them (open_clip projects only the pooled CLS).
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected pixels [N, 3, {self.image_size}, {self.image_size}], got {tuple(pixels.shape)}"
            )
        v = self.model.visual
        x = pixels.to(device=v.conv1.weight.device, dtype=v.conv1.weight.dtype)
        x = v.conv1(x)  # [N, width, g, g]
        x = x.flatten(2).transpose(1, 2)  # [N, g*g, width], row-major grid
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        x = v.ln_pre(x)
        x = v.transformer(x)
        x = v.ln_post(x)
        return x @ v.proj

    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, S, S] -> float32 [N, L, D] on the CPU (no grad); row 0 = `encode_image`.

        On CUDA the pixels go up through a reused pinned host buffer (an asynchronous copy that the
        encoder's first kernel waits for) instead of being pinned anew for every batch."""
        with torch.inference_mode():
            return self.frame_tokens(self.upload(pixels)).float().cpu()

    def upload(self, pixels: torch.Tensor) -> torch.Tensor:
        """Host pixels -> the model's device (pinned, non-blocking on CUDA; unchanged on CPU)."""
        if self.device.type != "cuda" or pixels.device.type == "cuda":
            return pixels
        pixels = pixels.contiguous()
        n = pixels.numel()
        if self._pinned is None or self._pinned.numel() < n or self._pinned.dtype != pixels.dtype:
            self._pinned = torch.empty(max(n, 1), dtype=pixels.dtype).pin_memory()
        # The buffer is reused only after the previous batch's result came back with .cpu() (a sync).
        staged = self._pinned[:n].view(pixels.shape)
        staged.copy_(pixels)
        return staged.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------------------------- text
    def tokenize(self, texts: Sequence[str] | str, max_words: int) -> np.ndarray:
        """texts (M) -> int32 [M, W]: `<sot>` + bpe[:W-2] + `<eot>`, zero padded (W = max_words)."""
        return frame_ids(self.tokenizer.encode, texts, max_words, self.sot_id, self.eot_id, self.context_length)

    def text_features(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [M, W] -> [M, D] on the model's device, differentiable.

        Runs only the first W positions: with the causal mask nothing after <eot> can reach it,
        so this equals `encode_text` of the ids zero-padded to the context length.
        """
        model = self.model
        if ids.ndim != 2 or not 1 <= ids.shape[1] <= self.context_length:
            raise ValueError(
                f"expected token ids [M, W] with W <= {self.context_length}, got {tuple(ids.shape)}"
            )
        ids = ids.to(device=model.token_embedding.weight.device, dtype=torch.long)
        eot_pos = ids.argmax(dim=-1)
        if ids.shape[0] and not bool((ids.gather(1, eot_pos[:, None]) == self.eot_id).all()):
            raise ValueError("every row of token ids must contain <eot> (use ClipEncoder.tokenize)")
        width = ids.shape[1]
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(ids).to(cast) + model.positional_embedding[:width].to(cast)
        mask = model.attn_mask[:width, :width] if model.attn_mask is not None else None
        x = model.transformer(x, attn_mask=mask)
        x = model.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_pos]
        return x @ model.text_projection

    def encode_texts(self, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """ids int [M, W] -> float32 [M, D] on the CPU (no grad), = `encode_text` unnormalised."""
        with torch.inference_mode():
            ids_t = ids if torch.is_tensor(ids) else torch.from_numpy(np.asarray(ids))
            return self.text_features(ids_t).float().cpu()
