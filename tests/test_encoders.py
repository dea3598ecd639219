"""ClipEncoder: cached tokens and text embeddings are exactly open_clip's features (MUSE_SPEC section 2)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from muse_pipeline.encoders import ClipEncoder, UnsupportedModelError, register_tiny_config
from muse_pipeline.video.transforms import preprocess_frames


@pytest.fixture(scope="module")
def enc() -> ClipEncoder:
    return ClipEncoder("muse-tiny")


def _pixels(n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _frame(h: int = 180, w: int = 320) -> np.ndarray:
    """A smooth synthetic video frame (gradients and a disc), uint8 [H, W, 3]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255 * xx / w
    g = 255 * yy / h
    b = 128 + 100 * np.sin(xx / 23.0) * np.cos(yy / 17.0)
    disc = (xx - 0.6 * w) ** 2 + (yy - 0.4 * h) ** 2 < (0.2 * h) ** 2
    r[disc], g[disc], b[disc] = 230, 40, 40
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def test_geometry_read_from_model(enc: ClipEncoder) -> None:
    assert (enc.image_size, enc.grid, enc.num_tokens, enc.dim) == (224, 7, 50, 64)
    assert enc.weights_id == "random-init"
    assert enc.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert enc.std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    d = enc.describe()
    assert d["model_name"] == "muse-tiny" and d["num_tokens"] == 50 and d["weights_id"] == "random-init"
    json.dumps(d)  # the fingerprint must be JSON-serialisable


def test_cls_row_equals_encode_image(enc: ClipEncoder) -> None:
    pixels = _pixels(3)
    tokens = enc.encode_frames(pixels)
    assert tokens.shape == (3, 50, 64) and tokens.dtype == torch.float32
    with torch.no_grad():
        ref = enc.model.encode_image(pixels)
    torch.testing.assert_close(tokens[:, 0], ref, rtol=1e-5, atol=1e-5)
    # The patch rows are real, distinct features, not copies of the CLS row.
    assert not torch.allclose(tokens[:, 1], tokens[:, 0])


def test_patch_tokens_equal_open_clip_output_tokens_projected(enc: ClipEncoder) -> None:
    """open_clip's own `output_tokens=True` path gives unprojected patch tokens after ln_post."""
    pixels = _pixels(2, seed=1)
    visual = enc.model.visual
    visual.output_tokens = True
    try:
        with torch.no_grad():
            pooled, patches = visual(pixels)
    finally:
        visual.output_tokens = False
    tokens = enc.encode_frames(pixels)
    torch.testing.assert_close(tokens[:, 1:], patches @ visual.proj, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens[:, 0], pooled, rtol=1e-5, atol=1e-5)


def test_random_init_is_reproducible(enc: ClipEncoder) -> None:
    """Every extraction worker must build the same 'random-init' weights."""
    torch.manual_seed(1234)  # the global RNG state must not matter
    other = ClipEncoder("muse-tiny")
    pixels = _pixels(1, seed=2)
    torch.testing.assert_close(other.encode_frames(pixels), enc.encode_frames(pixels), rtol=0, atol=0)


def test_frame_tokens_is_differentiable(enc: ClipEncoder) -> None:
    pixels = _pixels(1, seed=3).requires_grad_(True)
    enc.frame_tokens(pixels).square().sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_bad_pixel_shape_is_refused(enc: ClipEncoder) -> None:
    with pytest.raises(ValueError, match=r"\[N, 3, 224, 224\]"):
        enc.encode_frames(torch.zeros(1, 3, 112, 112))


def test_tokenize_layout(enc: ClipEncoder) -> None:
    bpe_short = enc.tokenizer.encode("a red circle")
    bpe_long = enc.tokenizer.encode("one two three four five six seven eight nine ten")
    assert len(bpe_long) > 6
    ids = enc.tokenize(["a red circle", "one two three four five six seven eight nine ten", ""], max_words=8)
    assert ids.dtype == np.int32 and ids.shape == (3, 8)
    sot, eot = enc.tokenizer.sot_token_id, enc.tokenizer.eot_token_id
    # short caption: sot, bpe, eot, zero padding
    n = len(bpe_short)
    assert ids[0, 0] == sot and list(ids[0, 1 : 1 + n]) == bpe_short and ids[0, 1 + n] == eot
    assert (ids[0, 2 + n :] == 0).all()
    # long caption: truncated to W - 2 tokens, eot in the last slot
    assert list(ids[1, 1:7]) == bpe_long[:6] and ids[1, 7] == eot
    # empty caption: sot, eot, padding
    assert list(ids[2]) == [sot, eot, 0, 0, 0, 0, 0, 0]
    # same ids as open_clip's tokenizer at full context (no truncation needed)
    ref = open_clip.get_tokenizer("muse-tiny")(["a red circle"])[0, :8].numpy()
    np.testing.assert_array_equal(ids[0], ref)
    with pytest.raises(ValueError, match="max_words"):
        enc.tokenize(["x"], max_words=100)


def test_eot_embedding_equals_encode_text(enc: ClipEncoder) -> None:
    texts = ["a red circle moves left to right", "a blue square " * 20, "x"]
    ids = enc.tokenize(texts, max_words=16)
    emb = enc.encode_texts(ids)
    assert emb.shape == (3, 64) and emb.dtype == torch.float32
    padded = torch.zeros(3, 77, dtype=torch.long)
    padded[:, :16] = torch.from_numpy(ids)
    with torch.no_grad():
        ref = enc.model.encode_text(padded)
    torch.testing.assert_close(emb, ref, rtol=1e-5, atol=1e-5)
    # different captions give different embeddings (the EOT position is taken per row)
    assert not torch.allclose(emb[0], emb[2])


def test_ids_without_eot_are_refused(enc: ClipEncoder) -> None:
    with pytest.raises(ValueError, match="eot"):
        enc.encode_texts(np.zeros((1, 8), dtype=np.int32))


def test_vit_b16_geometry_gives_197_tokens() -> None:
    enc16 = ClipEncoder("muse-tiny-16")
    assert (enc16.grid, enc16.num_tokens) == (14, 197)
    pixels = _pixels(1, seed=4)
    tokens = enc16.encode_frames(pixels)
    assert tokens.shape == (1, 197, 64)
    with torch.no_grad():
        torch.testing.assert_close(tokens[:, 0], enc16.model.encode_image(pixels), rtol=1e-5, atol=1e-5)


def test_local_weights_file_round_trip(enc: ClipEncoder, tmp_path) -> None:
    # Perturb the weights so that a load that silently fell back to the seeded random init would fail.
    trained = ClipEncoder("muse-tiny")
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in trained.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    path = tmp_path / "tiny.pt"
    torch.save(trained.model.state_dict(), path)

    loaded = ClipEncoder("muse-tiny", pretrained=path)
    assert loaded.weights_id == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.describe()["weights_id"] == loaded.weights_id
    pixels = _pixels(2, seed=5)
    torch.testing.assert_close(loaded.encode_frames(pixels), trained.encode_frames(pixels), rtol=0, atol=0)
    ids = loaded.tokenize(["a green triangle"], 12)
    torch.testing.assert_close(loaded.encode_texts(ids), trained.encode_texts(ids), rtol=0, atol=0)
    assert not torch.allclose(loaded.encode_frames(pixels), enc.encode_frames(pixels))


def test_bad_pretrained_values() -> None:
    with pytest.raises(FileNotFoundError):
        ClipEncoder("muse-tiny", pretrained="/no/such/weights.pt")
    with pytest.raises(ValueError, match="neither a file nor a pretrained tag"):
        ClipEncoder("muse-tiny", pretrained="openai")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipEncoder("no-such-model")


def test_non_standard_pooling_is_refused(tmp_path) -> None:
    register_tiny_config()
    cfg = open_clip.get_model_config("muse-tiny")  # a deep copy
    cfg["vision_cfg"]["pool_type"] = "avg"
    path = tmp_path / "muse-test-avgpool.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    with pytest.raises(UnsupportedModelError, match="pool_type"):
        ClipEncoder("muse-test-avgpool")


def test_our_preprocess_matches_open_clip_preprocess(enc: ClipEncoder) -> None:
    """Spec section 1: CLS of our frame pipeline vs open_clip's own preprocess, cosine >= 0.999."""
    frames_list = [_frame(180, 320), _frame(300, 220)]  # landscape and portrait
    oc_transform = open_clip.image_transform(enc.image_size, is_train=False, mean=enc.mean, std=enc.std)
    for frame in frames_list:
        ours = preprocess_frames(frame[None], enc.image_size, enc.mean, enc.std)
        theirs = oc_transform(Image.fromarray(frame))[None]
        assert ours.shape == theirs.shape == (1, 3, 224, 224)
        # PIL rounds to uint8 after resizing: a few thousandths in normalised units on average.
        assert (ours - theirs).abs().mean().item() < 0.01
        cls_ours = enc.encode_frames(ours)[:, 0]
        cls_theirs = enc.encode_frames(theirs)[:, 0]
        cos = F.cosine_similarity(cls_ours, cls_theirs).item()
        assert cos >= 0.999, cos
