"""CLIP weights FILES: OpenAI's TorchScript archives and releases build QuickGELU, junk is one error line,
and what the encoder reports (activation, logit_scale) for the cache fingerprint."""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

from muse_pipeline.encoders import weights_file
from muse_pipeline.encoders.clip import ClipEncoder, check_pretrained, register_tiny_config
from muse_pipeline.errors import InputError

# OpenAI's published ViT-B/32 download address (github.com/openai/CLIP, clip/clip.py): ground truth
# for the table read from open_clip at run time.
OPENAI_B32 = "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"


def _tiny_clip(quick_gelu: bool, seed: int = 3) -> torch.nn.Module:
    """muse-tiny with weights moved away from the seeded random init (so a silent re-init is caught)
    and logit_scale 3.0 (not open_clip's ln(1/0.07) default)."""
    register_tiny_config()
    torch.manual_seed(seed)
    model = open_clip.create_model("muse-tiny", force_quick_gelu=quick_gelu).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        model.logit_scale.fill_(3.0)
    return model


def _archive(model: torch.nn.Module, path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still works
        scripted = torch.jit.script(model)
        scripted.save(str(path))
    return scripted


def _pixels_and_ids(enc: ClipEncoder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ids = torch.from_numpy(enc.tokenize(["a red disc", "two green squares move left"], 12)).long()
    padded = torch.zeros(2, 77, dtype=torch.long)
    padded[:, :12] = ids
    return pixels, ids, padded


@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quickgelu", "gelu"])
def test_torchscript_archive_builds_its_own_activation(tmp_path, quick_gelu):
    """A TorchScript archive (OpenAI's release format) given as a FILE with the plain GELU config: the
    encoder builds the archive's activation and its features equal the scripted model's own output."""
    model = _tiny_clip(quick_gelu)
    path = tmp_path / "tiny-openai.pt"
    scripted = _archive(model, path)
    assert weights_file.is_torchscript_archive(path)

    enc = ClipEncoder("muse-tiny", pretrained=str(path))  # muse-tiny's config is GELU
    built = any(isinstance(m, QuickGELU) for m in enc.model.modules())
    assert built is quick_gelu and enc.quick_gelu is quick_gelu
    info = enc.describe()
    assert info["clip_activation"] == ("quick_gelu" if quick_gelu else "gelu")
    assert info["weights_id"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["logit_scale"] == pytest.approx(3.0)

    pixels, ids, padded = _pixels_and_ids(enc)
    with torch.no_grad():
        want_image = scripted.encode_image(pixels)
        want_text = scripted.encode_text(padded)
    torch.testing.assert_close(enc.encode_frames(pixels)[:, 0], want_image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc.encode_texts(ids), want_text, rtol=1e-5, atol=1e-5)
    if quick_gelu:
        # the check has teeth: the same weights under GELU give other features
        gelu = open_clip.create_model("muse-tiny")
        gelu.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert not torch.allclose(gelu.eval().encode_image(pixels), want_image, rtol=1e-3, atol=1e-3)


def test_archive_check_pretrained_accepts_it(tmp_path):
    path = tmp_path / "tiny.pt"
    _archive(_tiny_clip(True), path)
    check_pretrained("muse-tiny", str(path))  # torch.load(weights_only) alone would refuse an archive


def test_openai_release_sha256s_come_from_open_clip():
    releases = weights_file.openai_release_sha256s()
    assert releases[OPENAI_B32] == "ViT-B-32.pt"
    assert len(releases) >= 9 and all(len(sha) == 64 for sha in releases)


def test_state_dict_with_an_openai_release_sha256_builds_quickgelu(tmp_path, monkeypatch):
    """A plain state-dict file is known as OpenAI's by its sha256 (the real releases are too large for a
    test, so the table gets this file's digest, under the name of a real release)."""
    model = _tiny_clip(True)
    path = tmp_path / "ViT-B-32.pt"
    torch.save(model.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setattr(weights_file, "openai_release_sha256s", lambda: {digest: "ViT-B-32.pt"})
    enc = ClipEncoder("muse-tiny", pretrained=str(path))
    assert enc.quick_gelu and enc.describe()["clip_activation"] == "quick_gelu"
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_frames(pixels)[:, 0], model.encode_image(pixels), rtol=1e-5, atol=1e-5)
    # without the release digest the same file follows the (GELU) config
    monkeypatch.setattr(weights_file, "openai_release_sha256s", lambda: {})
    assert not ClipEncoder("muse-tiny", pretrained=str(path)).quick_gelu


def test_open_clip_download_of_openai_weights_builds_quickgelu(tmp_path):
    """What `--pretrained openai` downloads sits in the Hugging Face cache folder of a hub repo that
    open_clip marks quick_gelu; that file given by path is built with QuickGELU."""
    repo = open_clip.get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"].strip("/")
    folder = tmp_path / ("models--" + repo.replace("/", "--")) / "snapshots" / "abc"
    folder.mkdir(parents=True)
    path = folder / "open_clip_pytorch_model.bin"
    torch.save(_tiny_clip(True).state_dict(), path)
    assert ClipEncoder("muse-tiny", pretrained=str(path)).quick_gelu
    elsewhere = tmp_path / "copied.bin"
    elsewhere.write_bytes(path.read_bytes())
    assert not ClipEncoder("muse-tiny", pretrained=str(elsewhere)).quick_gelu  # the file alone does not say


def test_gelu_archive_with_a_quickgelu_config_is_refused(tmp_path):
    register_tiny_config()
    cfg = open_clip.get_model_config("muse-tiny")
    cfg["quick_gelu"] = True
    (tmp_path / "muse-test-tiny-quickgelu.json").write_text(__import__("json").dumps(cfg))
    open_clip.add_model_config(tmp_path / "muse-test-tiny-quickgelu.json")
    path = tmp_path / "gelu.pt"
    _archive(_tiny_clip(False), path)
    with pytest.raises(InputError, match="GELU, but muse-test-tiny-quickgelu builds QuickGELU"):
        ClipEncoder("muse-test-tiny-quickgelu", pretrained=str(path))


@pytest.mark.parametrize("junk", [b"\x00\x01 not a checkpoint " * 50, b"PK\x03\x04 truncated zip"])
def test_junk_weights_file_is_one_error_line(tmp_path, junk):
    path = tmp_path / "weights.pt"
    path.write_bytes(junk)
    for call in (lambda: ClipEncoder("muse-tiny", pretrained=str(path)), lambda: check_pretrained("muse-tiny", str(path))):
        with pytest.raises(InputError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and str(path) in message and "not a weights file" in message


def test_random_init_reports_open_clip_defaults():
    info = ClipEncoder("muse-tiny").describe()
    assert info["clip_activation"] == "gelu" and info["quick_gelu"] is False
    assert info["logit_scale"] == pytest.approx(math.log(1 / 0.07))


def test_extraction_records_the_activation_and_refuses_junk(synthetic_root, tmp_path):
    """The cache fingerprint says which activation and logit_scale the features come from; a junk
    weights file is refused in one line before the store exists."""
    from muse_pipeline.cache.store import FeatureCache
    from muse_pipeline.stages.extract import run_extract

    archive = tmp_path / "tiny-openai.pt"
    _archive(_tiny_clip(True), archive)
    out = tmp_path / "cache.zarr"
    summary = run_extract(dataset="synthetic", data_root=synthetic_root, out=out, model="muse-tiny",
                          pretrained=str(archive), frames=2, workers=0, quiet=True)
    assert summary.n_failed == 0
    fp = FeatureCache.open(out).fingerprint
    assert fp["encoder"]["clip_activation"] == "quick_gelu" and fp["encoder"]["quick_gelu"] is True
    assert fp["encoder"]["logit_scale"] == pytest.approx(3.0)
    assert fp["weights"] == hashlib.sha256(archive.read_bytes()).hexdigest()

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x04 junk " * 64)
    with pytest.raises(InputError, match=f"--pretrained {junk} is not a weights file"):
        run_extract(dataset="synthetic", data_root=synthetic_root, out=tmp_path / "junk.zarr", model="muse-tiny",
                    pretrained=str(junk), frames=2, workers=0, quiet=True)
    assert not (tmp_path / "junk.zarr").exists()
