"""Run-directory weights and resumable state (layout in docs/ARCHITECTURE.md, "Run directory").

Every write goes to a temporary file in the same directory and is then `os.replace`d, so a crash
or Ctrl-C never leaves a half-written checkpoint: a reader sees the old file or the new one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from muse_pipeline.atomic import atomic_write
from muse_pipeline.errors import MissingInput

WEIGHT_NAMES = ("best", "last")
# End-to-end runs also fine-tune CLIP: its weights live in the same file under this prefix.
CLIP_PREFIX = "clip."


def atomic_torch_save(path: Path | str, obj: Any) -> None:
    atomic_write(path, lambda p: torch.save(obj, p))


def _plain_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; clone to contiguous CPU tensors.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def save_run_weights(
    run_dir: Path | str, name: str, model: torch.nn.Module, clip: torch.nn.Module | None = None
) -> Path:
    """Write `<run_dir>/<name>.safetensors` (name "best" or "last") with the model's state dict.

    `clip`: the fine-tuned CLIP model of an end-to-end run, stored under the `clip.` prefix.
    """
    if name not in WEIGHT_NAMES:
        raise ValueError(f"weights name must be one of {WEIGHT_NAMES}, got {name!r}")
    tensors = _plain_state(model)
    if clip is not None:
        tensors.update({CLIP_PREFIX + k: v for k, v in _plain_state(clip).items()})
    path = Path(run_dir) / f"{name}.safetensors"
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": "muse-run", "name": name}))
    return path


def read_run_config(run_dir: Path | str) -> dict[str, Any]:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise MissingInput(f"{run_dir} is not a run directory ({path.name} is missing); train one with `muse train`")
    return json.loads(path.read_text())


def load_weights(run_dir: Path | str, which: str = "best") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model tensors, clip tensors) of `<which>.safetensors`; clip tensors are empty for cache runs."""
    if which not in WEIGHT_NAMES:
        raise ValueError(f"which must be one of {WEIGHT_NAMES}, got {which!r}")
    path = Path(run_dir) / f"{which}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (has the run finished an epoch?)")
    tensors = load_file(str(path))
    model = {k: v for k, v in tensors.items() if not k.startswith(CLIP_PREFIX)}
    clip = {k[len(CLIP_PREFIX) :]: v for k, v in tensors.items() if k.startswith(CLIP_PREFIX)}
    return model, clip


def load_run(run_dir: Path | str, which: str = "best"):  # -> tuple[RetrievalModel, dict]
    """The trained RetrievalModel of a run (eval mode, CPU) and its config.json as a dict."""
    from muse_pipeline.models.retrieval import ModelConfig, RetrievalModel

    config = read_run_config(run_dir)
    model = RetrievalModel(ModelConfig.from_dict(config["model"]))
    state, _ = load_weights(run_dir, which)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, config
