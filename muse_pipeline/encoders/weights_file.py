"""A CLIP weights FILE (`--pretrained FILE`): its format, which activation it was trained with, its tensors.

Formats: a TorchScript archive (a zip holding `<name>/constants.pkl`, `<name>/data.pkl` and
`<name>/code/`: how OpenAI released CLIP, `https://openaipublic.azureedge.net/clip/models/<sha256>/
<name>.pt`), a safetensors file, or a torch checkpoint (a state dict, possibly under "state_dict").

Why the activation matters: OpenAI trained CLIP with QuickGELU (x * sigmoid(1.702 x)), open_clip's
plain configs (`ViT-B-32`) build GELU, and OpenAI's weights load into either without an error; with
the wrong one every feature differs from OpenAI's CLIP. So the file decides where it can:
- a TorchScript archive defines its modules' classes in its `code/` folder: `QuickGELU` or `GELU` is
  read there (text, nothing executed); an archive defining neither is taken as OpenAI's, as open_clip's
  `load_openai_model` builds every archive with QuickGELU;
- a file whose sha256 is that of an OpenAI release (the sha256 in the download addresses of the
  installed open_clip's pretrained table, read at run time) is QuickGELU;
- a file in the Hugging Face cache folder (`models--ORG--NAME`) of a hub repo that open_clip's table
  marks quick_gelu (what `--pretrained openai` downloads) is QuickGELU;
- any other file does not say (`quick_gelu` None) and the model config's activation is used. A
  converted OpenAI state dict copied elsewhere cannot be told from GELU weights: it needs the
  `-quickgelu` config (e.g. `--model ViT-B-32-quickgelu`), as the README says.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from muse_pipeline.errors import InputError

OPENAI_URL = re.compile(r"^https://openaipublic\.azureedge\.net/clip/models/([0-9a-f]{64})/([^/]+)$")
# open_clip's loader drops these non-tensor entries of OpenAI's archives (factory.load_state_dict).
_ARCHIVE_SCALARS = ("input_resolution", "context_length", "vocab_size")


class WeightsFileError(InputError):
    """The weights file cannot be read as CLIP weights (junk, truncated, another format)."""


@dataclass(frozen=True)
class WeightsFile:
    """What `identify` found. `quick_gelu`: True/False when the file says, None when it does not."""

    path: str
    sha256: str
    format: str  # "torchscript" | "safetensors" | "checkpoint"
    quick_gelu: bool | None
    reason: str  # why `quick_gelu` is what it is, in words


def is_torchscript_archive(path: str | os.PathLike[str]) -> bool:
    """True for a zip whose top folder holds `constants.pkl` and `data.pkl` (torch's own test is the
    `constants.pkl` record, serialization._is_torchscript_zip)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    leaves = {name.split("/", 1)[1] for name in names if "/" in name}
    return "constants.pkl" in leaves and "data.pkl" in leaves


def archive_classes(path: str | os.PathLike[str]) -> set[str]:
    """Names of the classes a TorchScript archive's `code/` folder defines (read as text)."""
    found: set[str] = set()
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if "/code/" in name and name.endswith(".py"):
                text = archive.read(name).decode("utf-8", errors="replace")
                found.update(re.findall(r"^class (\w+)\(", text, flags=re.MULTILINE))
    return found


def _pretrained_cfgs() -> list[dict]:
    import open_clip

    return [open_clip.get_pretrained_cfg(model, tag) for model, tag in open_clip.list_pretrained()]


@lru_cache(maxsize=1)
def openai_release_sha256s() -> dict[str, str]:
    """sha256 -> release file name (e.g. "ViT-B-32.pt") of every OpenAI checkpoint in the installed
    open_clip's pretrained table (the sha256 is part of its download address)."""
    releases = {}
    for cfg in _pretrained_cfgs():
        match = OPENAI_URL.match(cfg.get("url") or "")
        if match:
            releases[match.group(1)] = match.group(2)
    return releases


@lru_cache(maxsize=1)
def quick_gelu_hub_folders() -> dict[str, str]:
    """Hugging Face cache folder name (`models--ORG--NAME`) -> hub repo, for every hub repo that the
    installed open_clip's pretrained table marks quick_gelu."""
    folders = {}
    for cfg in _pretrained_cfgs():
        repo = (cfg.get("hf_hub") or "").strip("/")
        if repo and cfg.get("quick_gelu", False):
            folders["models--" + repo.replace("/", "--")] = repo
    return folders


def identify(path: str | os.PathLike[str], sha256: str) -> WeightsFile:
    """Format and activation of the weights file at `path` (whose sha256 the caller computed)."""
    path = os.fspath(path)
    if is_torchscript_archive(path):
        fmt = "torchscript"
    elif path.endswith(".safetensors"):
        fmt = "safetensors"
    else:
        fmt = "checkpoint"
    release = openai_release_sha256s().get(sha256)
    if release is not None:
        return WeightsFile(path, sha256, fmt, True, f"sha256 of OpenAI's released {release} (trained with QuickGELU)")
    if fmt == "torchscript":
        classes = archive_classes(path)
        if "QuickGELU" in classes:
            return WeightsFile(path, sha256, fmt, True, "TorchScript archive whose MLPs are QuickGELU")
        if "GELU" in classes:
            return WeightsFile(path, sha256, fmt, False, "TorchScript archive whose MLPs are GELU")
        return WeightsFile(path, sha256, fmt, True, "TorchScript archive (OpenAI's release format, QuickGELU)")
    hub = quick_gelu_hub_folders()
    for part in (*Path(path).parts, *Path(path).resolve().parts):
        if part in hub:
            return WeightsFile(path, sha256, fmt, True, f"open_clip's download of {hub[part]} (QuickGELU)")
    return WeightsFile(path, sha256, fmt, None, "the file does not say; the model config decides")


def torchscript_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive on the CPU, as open_clip reads them (its loader calls
    `torch.load`, which refuses archives under weights_only). WeightsFileError if it cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still works
            scripted = torch.jit.load(os.fspath(path), map_location="cpu")
    except Exception as err:  # noqa: BLE001  any failure means "not a readable archive"
        raise WeightsFileError(
            f"--pretrained {path} looks like a TorchScript archive but torch cannot load it "
            f"({type(err).__name__}); download the checkpoint again"
        ) from None
    state = dict(scripted.state_dict())
    for key in _ARCHIVE_SCALARS:
        state.pop(key, None)
    return state


def check_readable(path: str | os.PathLike[str]) -> None:
    """WeightsFileError unless `path` opens as safetensors, a torch checkpoint (read lazily: a large
    file costs no full load) or a TorchScript archive. The message names the file and what to do."""
    path = os.fspath(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                f.keys()
        elif is_torchscript_archive(path):
            return  # its records are checked by the zip reader; the tensors load with the model
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torch's notes on junk would precede the error line
                try:
                    torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                except RuntimeError:  # an old (non-zip) checkpoint cannot be memory-mapped
                    torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  any failure to read means "not weights"
        raise WeightsFileError(not_weights_message(path, err)) from None


def not_weights_message(path: str | os.PathLike[str], err: BaseException) -> str:
    """The one line for a --pretrained file that does not hold CLIP weights."""
    return (f"--pretrained {os.fspath(path)} is not a weights file torch can read ({type(err).__name__}); "
            "give a .pt/.bin/.safetensors checkpoint or a pretrained tag (restore or download the file again)")
