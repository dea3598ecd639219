"""BiMamba / ResMamba / pyramid / sequence / heads / RetrievalModel / loss / param groups."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from muse_pipeline.models import (
    HEADS,
    BiMamba,
    ModelConfig,
    MultiScalePyramid,
    ResMamba,
    RetrievalModel,
    build_head,
    contrastive_loss,
    pack_sequence,
    param_groups,
    selective_scan_ref,
)
from muse_pipeline.models.params import DEFAULT_LR_MULT

DIM = 16


def perturb_out_fc(model: torch.nn.Module, seed: int = 0) -> None:
    """Zero-init out_fc makes every fusion stack the identity; give them weights so the fusion matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "out_fc" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def tokens_for(b, t, grid, dim=DIM, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 1 + grid * grid, dim, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------- BiMamba


def direct_composition(m: BiMamba, x: torch.Tensor) -> torch.Tensor:
    """BiMamba written out from spec section 5 with the sequential reference scan."""
    xz = x @ m.in_proj.weight.t()
    xi, z = xz[..., : m.d_inner].transpose(1, 2), xz[..., m.d_inner :].transpose(1, 2)

    def direction(p, xi, z):
        w = p.conv1d.weight  # [d, 1, k]
        xc = F.silu(F.conv1d(F.pad(xi, (w.shape[-1] - 1, 0)), w, p.conv1d.bias, groups=xi.shape[1]))
        dbc = xc.transpose(1, 2) @ p.x_proj.weight.t()
        dt, b, c = dbc[..., : p.dt_rank], dbc[..., p.dt_rank : p.dt_rank + p.d_state], dbc[..., p.dt_rank + p.d_state :]
        delta = (dt @ p.dt_proj.weight.t()).transpose(1, 2)
        return selective_scan_ref(xc, delta, -torch.exp(p.A_log), b.transpose(1, 2), c.transpose(1, 2),
                                  D=p.D, z=z, delta_bias=p.dt_proj.bias, delta_softplus=True)

    y = direction(m.fwd, xi, z) + direction(m.bwd, xi.flip(-1), z.flip(-1)).flip(-1)
    return y.transpose(1, 2) @ m.out_proj.weight.t()


def test_bimamba_equals_direct_per_direction_composition():
    torch.manual_seed(0)
    m = BiMamba(DIM, d_state=4).double()
    x = torch.randn(2, 13, DIM, dtype=torch.float64)
    expected = direct_composition(m, x)
    torch.testing.assert_close(m(x), expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(m(x, reference=True), expected, atol=1e-10, rtol=1e-10)


def _bimamba_grads(m: BiMamba, x: torch.Tensor, pad, gy: torch.Tensor, reference: bool) -> dict[str, torch.Tensor]:
    m.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = m(x, pad, reference=reference)
    (y * gy).sum().backward()
    return {"y": y.detach(), "x": x.grad, **{n: p.grad.clone() for n, p in m.named_parameters()}}


@pytest.mark.parametrize("scan, fused", [("numba", True), ("torch", False)])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_bimamba_cpu_paths_match_reference_gradients(monkeypatch, scan, fused, dtype, tol):
    # the CPU paths against reference=True (sequential scan + F.conv1d, plain autograd): the fused mixer
    # of bimamba_cpu (numba scan) and the checkpointed autograd composition (MUSE_SCAN=torch); output,
    # input gradient and every parameter's gradient; 150 steps (several scan checkpoints), padding in the
    # middle of one row and at the end of the other
    from muse_pipeline.models import bimamba_cpu

    monkeypatch.setenv("MUSE_SCAN", scan)
    calls = []
    real_apply = bimamba_cpu._BiMambaInner.apply
    monkeypatch.setattr(bimamba_cpu._BiMambaInner, "apply", lambda *a: calls.append(1) or real_apply(*a))
    torch.manual_seed(2)
    m = BiMamba(DIM, d_state=4).to(dtype)
    x = torch.randn(2, 150, DIM, dtype=dtype)
    pad = torch.zeros(2, 150, dtype=torch.bool)
    pad[0, 40:47] = True
    pad[1, 120:] = True
    gy = torch.randn(2, 150, DIM, dtype=dtype)
    fast = _bimamba_grads(m, x, pad, gy, reference=False)
    assert len(calls) == (1 if fused else 0)
    ref = _bimamba_grads(m, x, pad, gy, reference=True)
    assert fast.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], atol=tol, rtol=tol, msg=name)


def test_fused_cpu_mixer_saves_only_its_input():
    # what the fused mixer keeps for the backward: x itself and the parameters, no activation
    torch.manual_seed(0)
    m = BiMamba(DIM, d_state=4)
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    x = torch.randn(2, 100, DIM, requires_grad=True)
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params and t.numel() > 4 * DIM:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    assert len(saved) == 1 and saved[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    y.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in m.parameters())


def test_fused_cpu_mixer_reuses_buffers_safely():
    # the workspace's buffers are reused across calls of different lengths: outputs and gradients must
    # not alias them (an earlier output stays as it was) and a short call after a long one stays exact
    from muse_pipeline.models.bimamba_cpu import WORKSPACE

    torch.manual_seed(3)
    m = BiMamba(DIM, d_state=4).double()
    long_x, short_x = torch.randn(1, 90, DIM, dtype=torch.float64), torch.randn(3, 20, DIM, dtype=torch.float64)
    WORKSPACE.clear()
    y_long = m(long_x)
    kept = y_long.clone()
    grown = WORKSPACE.nbytes()
    short = _bimamba_grads(m, short_x, None, torch.ones(3, 20, DIM, dtype=torch.float64), reference=False)
    assert WORKSPACE.nbytes() >= grown > 0
    torch.testing.assert_close(y_long, kept, atol=0, rtol=0)
    ref = _bimamba_grads(m, short_x, None, torch.ones(3, 20, DIM, dtype=torch.float64), reference=True)
    for name in ref:
        torch.testing.assert_close(short[name], ref[name], atol=1e-10, rtol=1e-10, msg=name)


def test_bimamba_padding_is_exact_in_both_directions():
    torch.manual_seed(1)
    m = BiMamba(DIM, d_state=4).double()
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    garbage = 5 * torch.randn(2, 6, DIM, dtype=torch.float64)
    padded = torch.cat([x, garbage], dim=1)
    pad = torch.zeros(2, 15, dtype=torch.bool)
    pad[:, 9:] = True
    torch.testing.assert_close(m(padded, pad)[:, :9], m(x), atol=1e-12, rtol=1e-12)
    # and without the mask the padding leaks into the backward direction (the test can fail)
    assert not torch.allclose(m(padded)[:, :9], m(x), atol=1e-6)


def test_bimamba_mamba_init():
    m = BiMamba(64, d_state=16)
    for p in (m.fwd, m.bwd):
        assert p.dt_rank == 4
        torch.testing.assert_close(p.A_log, torch.log(torch.arange(1, 17.0)).repeat(64, 1))
        assert torch.equal(p.D, torch.ones(64))
        dt = F.softplus(p.dt_proj.bias)
        assert dt.min() >= 1e-3 - 1e-7 and dt.max() <= 0.1 + 1e-7
        assert p.dt_proj.weight.abs().max() <= 4**-0.5
    assert m.in_proj.bias is None and m.out_proj.bias is None
    assert m.in_proj.weight.shape == (128, 64)


def test_resmamba_identity_at_init_and_dropout_schedule():
    torch.manual_seed(0)
    r = ResMamba(DIM, depth=4, d_state=4)
    x = torch.randn(2, 7, DIM)
    assert torch.equal(r(x), x)
    assert [b.drop.p for b in r.blocks] == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])
    assert all(torch.count_nonzero(b.out_fc.weight) == 0 for b in r.blocks)


# ---------------------------------------------------------------- pyramid and sequence


@pytest.mark.parametrize("g,expected", [(7, [3, 7, 14]), (14, [7, 14, 28])])
def test_pyramid_grids(g, expected):
    p = MultiScalePyramid(8)
    outs = p(torch.randn(2, g, g, 8))
    assert [o.shape for o in outs] == [torch.Size([2, s * s, 8]) for s in expected]
    assert p.grids(g) == expected
    channels_first = p(torch.randn(2, g, g, 8).permute(0, 3, 1, 2), channels_last=False)
    assert [o.shape for o in channels_first] == [o.shape for o in outs]


def test_pyramid_branches_are_registered_and_trained():
    head = build_head("muse", DIM, 3, 4, d_state=4)
    keys = list(head.state_dict())
    assert sum(k.startswith("pyramid.branches.") for k in keys) >= 3 * 5
    assert any(k.startswith("pyramid.branches.2.0.") for k in keys)  # the ConvTranspose2d of scale 2
    perturb_out_fc(head)
    head(tokens_for(2, 3, 3).float(), torch.ones(2, 3, dtype=torch.bool)).sum().backward()
    for i in range(3):
        grads = [p.grad for n, p in head.named_parameters() if n.startswith(f"pyramid.branches.{i}.")]
        assert grads and all(gr is not None and gr.abs().sum() > 0 for gr in grads)


def test_pack_sequence_scale_and_frame_order():
    # 2 videos; video 0 real frames t=0,2 (not a prefix), video 1 real frame t=1. Values encode (b, t, token).
    mask = torch.tensor([[True, False, True], [False, True, False]])
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    code = (b_idx * 100 + t_idx * 10).double()

    def seg(size, base):
        return (code[:, None] + base + torch.arange(size))[..., None].expand(-1, -1, 2)

    segments = [seg(1, 0), seg(2, 1), seg(3, 3)]  # CLS, a 2-token scale, a 3-token scale
    seq, pad, cls_index = pack_sequence(segments, mask, order="scale")
    assert seq.shape == (2, 12, 2)
    assert seq[0, :, 0].tolist() == [0, 20, 1, 2, 21, 22, 3, 4, 5, 23, 24, 25]
    assert seq[1, :6, 0].tolist() == [110, 111, 112, 113, 114, 115]
    assert pad[0].sum() == 0 and pad[1].tolist() == [False] * 6 + [True] * 6
    assert torch.all(seq[1, 6:] == 0)
    assert cls_index.tolist() == [[0, -1, 1], [-1, 0, -1]]
    seq_f, pad_f, cls_f = pack_sequence(segments, mask, order="frame")
    assert seq_f[0, :, 0].tolist() == [0, 1, 2, 3, 4, 5, 20, 21, 22, 23, 24, 25]
    assert cls_f.tolist() == [[0, -1, 6], [-1, 0, -1]]
    assert torch.equal(pad_f, pad)


def test_video_without_real_frames_is_an_error():
    head = build_head("muse", DIM, 3, 2, d_state=4)
    with pytest.raises(ValueError, match="at least one real frame"):
        head(tokens_for(2, 2, 3).float(), torch.tensor([[1, 1], [0, 0]]))


# ---------------------------------------------------------------- heads


def make_head(name, max_frames=6, grid=3):
    torch.manual_seed(0)
    kw = {"muse": dict(d_state=4, depth=2), "muse-transformer": dict(depth=2), "seqTransf": dict(layers=2)}
    head = build_head(name, DIM, grid, max_frames, **kw.get(name, {})).double().eval()
    perturb_out_fc(head)
    return head


def test_registry_lists_all_heads():
    assert set(HEADS.names()) == {"meanP", "seqTransf", "muse", "muse-transformer"}
    with pytest.raises(KeyError, match="known"):
        build_head("nope", DIM, 7, 4)


@pytest.mark.parametrize("name", ["muse", "muse-transformer"])
def test_multiscale_heads_start_as_meanp(name):
    head = build_head(name, DIM, 3, 4).double()
    tokens = tokens_for(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    expected = build_head("meanP", DIM, 3, 4)(tokens, mask)
    torch.testing.assert_close(head(tokens, mask), expected, atol=1e-12, rtol=1e-12)


def test_meanp_is_normalised_masked_mean_of_normalised_cls():
    tokens = tokens_for(1, 3, 3)
    out = build_head("meanP", DIM, 3, 3)(tokens, torch.tensor([[1, 0, 1]]))
    cls = F.normalize(tokens[0, [0, 2], 0], dim=-1)
    torch.testing.assert_close(out[0], F.normalize(cls.mean(0), dim=0))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize("name", ["muse", "seqTransf", "muse-transformer"])
def test_padding_invariance_and_batch_equals_single(name):
    head = make_head(name)
    tokens = tokens_for(2, 3, 3, seed=1)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    base = head(tokens, mask)
    assert base.shape == (2, DIM)
    torch.testing.assert_close(base.norm(dim=-1), torch.ones(2, dtype=torch.float64))
    # more padded frames, filled with garbage, change nothing
    more = torch.cat([tokens, 7 * tokens_for(2, 3, 3, seed=2)], dim=1)
    more_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(head(more, more_mask), base, atol=1e-10, rtol=1e-10)
    # each sample alone (no padding at all for sample 1) equals its row of the batch
    for i in range(2):
        n = int(mask[i].sum())
        torch.testing.assert_close(head(tokens[i : i + 1, :n], mask[i : i + 1, :n]), base[i : i + 1],
                                   atol=1e-10, rtol=1e-10)
    # and the fusion is not trivially the identity (else the invariance would be vacuous)
    meanp = build_head("meanP", DIM, 3, 6)(tokens, mask)
    assert not torch.allclose(base, meanp, atol=1e-4)


def test_muse_handles_non_prefix_masks():
    head = make_head("muse")
    tokens = tokens_for(1, 3, 3, seed=4)
    gap = head(tokens, torch.tensor([[1, 0, 1]], dtype=torch.bool))
    packed = head(tokens[:, [0, 2]], torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(gap, packed, atol=1e-10, rtol=1e-10)


def test_vit_b16_grid_runs():
    head = build_head("muse", DIM, 14, 2, d_state=4, depth=1)
    out = head(tokens_for(1, 2, 14).float(), torch.ones(1, 2, dtype=torch.bool))
    assert out.shape == (1, DIM) and torch.isfinite(out).all()
    seq, pad, _, _, _ = head.build_sequence(tokens_for(1, 2, 14).float(), torch.ones(1, 2, dtype=torch.bool))
    assert seq.shape[1] == 2 * (1 + 49 + 196 + 784)


def test_muse_sequence_length_for_b32():
    head = build_head("muse", DIM, 7, 3, d_state=4, depth=1)
    seq, pad, cls_index, _, _ = head.build_sequence(tokens_for(1, 3, 7).float(), torch.ones(1, 3, dtype=torch.bool))
    assert seq.shape[1] == 255 * 3 and cls_index.tolist() == [[0, 1, 2]]


# ---------------------------------------------------------------- retrieval model, loss, params


def test_model_config_round_trip_and_validation():
    cfg = ModelConfig(head="muse", dim=32, grid=7, max_frames=8, scales=(0.5, 1.0))
    d = cfg.to_dict()
    assert d["scales"] == [0.5, 1.0]
    assert ModelConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="unknown head"):
        ModelConfig(head="nope")
    with pytest.raises(AttributeError):
        cfg.dim = 3  # type: ignore[misc]


def test_retrieval_model_embeds_and_loss():
    model = RetrievalModel(ModelConfig(head="muse", dim=DIM, grid=3, max_frames=4, d_state=4, depth=1))
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    tokens = tokens_for(3, 4, 3).half()  # the cache stores float16
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    video = model.embed_videos(tokens, mask)
    assert video.dtype == torch.float32 and video.shape == (3, DIM)
    text = torch.randn(3, DIM)
    # zero-init adapter: the text embedding starts as CLIP's, normalised
    torch.testing.assert_close(model.embed_texts(text), F.normalize(text, dim=-1))
    loss = model(tokens, mask, text)
    torch.testing.assert_close(loss, contrastive_loss(F.normalize(text, dim=-1), video, model.logit_scale))
    loss.backward()
    assert model.text_adapter.fc.weight.grad.abs().sum() > 0
    assert model.logit_scale.grad is not None
    assert RetrievalModel(ModelConfig(head="meanP", dim=DIM, text_adapter=False)).text_adapter is None


def test_contrastive_loss_matches_explicit_formula():
    g = torch.Generator().manual_seed(0)
    t = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1)
    v = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(math.log(20.0), dtype=torch.float64)
    logits = 20.0 * t @ v.t()
    t2v = -sum(torch.log_softmax(logits[i], 0)[i] for i in range(5)) / 5
    v2t = -sum(torch.log_softmax(logits[:, i], 0)[i] for i in range(5)) / 5
    torch.testing.assert_close(contrastive_loss(t, v, scale), (t2v + v2t) / 2)
    # logit_scale is clamped at ln(100)
    big = contrastive_loss(t, v, torch.tensor(10.0, dtype=torch.float64))
    torch.testing.assert_close(big, contrastive_loss(t, v, torch.tensor(math.log(100.0), dtype=torch.float64)))
    with pytest.raises(ValueError, match="equal shapes"):
        contrastive_loss(t, v[:4], scale)


def test_param_groups_decay_and_lr_multipliers():
    model = RetrievalModel(ModelConfig(head="muse", dim=DIM, grid=3, max_frames=4, d_state=4, depth=1))
    groups = param_groups(model, 1e-4, 0.2, DEFAULT_LR_MULT)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert set(by_name) == {n for n, _ in model.named_parameters()}
    norm_params = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, torch.nn.LayerNorm)
                   for p, _ in mod.named_parameters(recurse=False)}
    assert any("pyramid" in n for n in norm_params)  # LayerNorm2d inside nn.Sequential: no "norm" in its name
    for name in by_name:
        leaf = name.rsplit(".", 1)[-1]
        no_decay = leaf in ("bias", "A_log", "D", "logit_scale") or name in norm_params
        assert (by_name[name]["weight_decay"] == 0.0) == no_decay, name
    assert by_name["head.fusion.blocks.0.mixer.fwd.A_log"]["lr"] == pytest.approx(1e-3)
    assert by_name["text_adapter.fc.weight"]["lr"] == pytest.approx(1e-3)
    assert by_name["logit_scale"]["lr"] == pytest.approx(1e-7)  # CLIP's temperature, at the CLIP lr
    assert by_name["head.fusion.blocks.0.mixer.in_proj.weight"]["weight_decay"] == 0.2
    torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6)  # the groups are a valid optimizer spec


# ------------------------------------------------------------------ seqTransf = CLIP4Clip's seqTransf


def _reference_clip_block(x, blk, heads, act):
    """CLIP's residual attention block written out by hand: x [B, L, D], no mask."""
    d = x.shape[-1]
    h = F.layer_norm(x, (d,), blk["ln_1.weight"], blk["ln_1.bias"])
    q, k, v = (h @ blk["attn.in_proj_weight"].t() + blk["attn.in_proj_bias"]).chunk(3, dim=-1)
    split = lambda t: t.unflatten(-1, (heads, d // heads)).transpose(1, 2)  # noqa: E731
    w = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    a = (w @ split(v)).transpose(1, 2).flatten(-2)
    x = x + a @ blk["attn.out_proj.weight"].t() + blk["attn.out_proj.bias"]
    h = F.layer_norm(x, (d,), blk["ln_2.weight"], blk["ln_2.bias"])
    h = h @ blk["mlp.c_fc.weight"].t() + blk["mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h) if act == "quick_gelu" else F.gelu(h)
    return x + h @ blk["mlp.c_proj.weight"].t() + blk["mlp.c_proj.bias"]


def test_seqtransf_uses_quick_gelu_and_base_lr():
    head = build_head("seqTransf", DIM, 3, 4, layers=2)
    acts = [type(m).__name__ for m in head.modules() if type(m).__name__ in ("QuickGELU", "GELU")]
    assert acts == ["QuickGELU", "QuickGELU"]
    assert head.LR_GROUP == "base" and build_head("muse", DIM, 3, 4, d_state=4, depth=1).LR_GROUP == "fusion"
    # a layer equals CLIP's block formula (random weights, QuickGELU)
    layer = head.transformer[0]
    with torch.no_grad():
        for prm in layer.parameters():
            prm.copy_(0.2 * torch.randn_like(prm))
    blk = {"ln_1.weight": layer.ln_1.weight, "ln_1.bias": layer.ln_1.bias, "attn.in_proj_weight": layer.attn.qkv.weight,
           "attn.in_proj_bias": layer.attn.qkv.bias, "attn.out_proj.weight": layer.attn.proj.weight,
           "attn.out_proj.bias": layer.attn.proj.bias, "ln_2.weight": layer.ln_2.weight, "ln_2.bias": layer.ln_2.bias,
           "mlp.c_fc.weight": layer.mlp[0].weight, "mlp.c_fc.bias": layer.mlp[0].bias,
           "mlp.c_proj.weight": layer.mlp[2].weight, "mlp.c_proj.bias": layer.mlp[2].bias}
    x = torch.randn(2, 4, DIM)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference_clip_block(x, blk, layer.attn.heads, "quick_gelu"))


def _tiny_clip_file(tmp_path, name="muse-tiny", seed=3):
    """A tiny open_clip CLIP saved to a local weights file: "pretrained" = this path."""
    import open_clip

    from muse_pipeline.encoders.clip import register_tiny_config

    register_tiny_config()
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    return path, model


def _text4_config(tmp_path) -> str:
    """muse-tiny with 4 text layers (test-local config): enough text layers for seqTransf's 4."""
    import json

    import open_clip

    from muse_pipeline.encoders.clip import MODEL_CONFIG_DIR

    cfg = json.loads((MODEL_CONFIG_DIR / "muse-tiny.json").read_text())
    cfg["text_cfg"]["layers"] = 4
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "muse-tiny-text4.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return "muse-tiny-text4"


@pytest.mark.parametrize("config", ["muse-tiny", "text4"])
def test_seqtransf_starts_as_clip_text_layers(tmp_path, config):
    """spec section 6: with pretrained CLIP (a weights FILE) seqTransf's layers are CLIP's text layers 0-3
    and its frame position embeddings CLIP's text positional_embedding[:T]; same function too."""
    from muse_pipeline.encoders.clip import ClipEncoder, file_sha256
    from muse_pipeline.models.clip_init import init_seqtransf, plan_seqtransf_init

    name = "muse-tiny" if config == "muse-tiny" else _text4_config(tmp_path)
    path, _ = _tiny_clip_file(tmp_path, name)
    enc = ClipEncoder(name, pretrained=str(path))
    assert enc.weights_id == file_sha256(path)
    plan = plan_seqtransf_init(model_name=name, pretrained=str(path), weights_id=enc.weights_id,
                               quick_gelu=enc.quick_gelu, dim=enc.dim, layers=4, max_frames=12)
    text_layers = len(enc.model.transformer.resblocks)
    assert plan.copy and plan.copied_layers == min(4, text_layers)
    assert plan.heads == enc.model.transformer.resblocks[0].attn.num_heads == 2 and plan.act == "gelu"
    torch.manual_seed(0)
    model = RetrievalModel(ModelConfig(head="seqTransf", dim=enc.dim, grid=enc.grid, max_frames=12,
                                       transformer_heads=plan.heads, transformer_act=plan.act))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init_seqtransf(model.head, plan)  # loads the weights file itself, as the trainer does from a cache
    clip_sd = torch.load(path, weights_only=True)  # ground truth: the file, not the code under test
    head_sd = model.head.state_dict()
    names = {"ln_1.weight": "ln_1.weight", "ln_1.bias": "ln_1.bias", "attn.qkv.weight": "attn.in_proj_weight",
             "attn.qkv.bias": "attn.in_proj_bias", "attn.proj.weight": "attn.out_proj.weight",
             "attn.proj.bias": "attn.out_proj.bias", "ln_2.weight": "ln_2.weight", "ln_2.bias": "ln_2.bias",
             "mlp.0.weight": "mlp.c_fc.weight", "mlp.0.bias": "mlp.c_fc.bias", "mlp.2.weight": "mlp.c_proj.weight",
             "mlp.2.bias": "mlp.c_proj.bias"}
    for i in range(4):
        for mine, theirs in names.items():
            key = f"transformer.{i}.{mine}"
            if i < text_layers:
                assert torch.equal(head_sd[key], clip_sd[f"transformer.resblocks.{i}.{theirs}"]), key
            else:  # no such text layer: left as initialised
                assert torch.equal(head_sd[key], before[f"head.{key}"]), key
    assert torch.equal(head_sd["frame_position_embeddings.weight"], clip_sd["positional_embedding"][:12])
    # and the copied layers compute CLIP's block (exact GELU: this tiny CLIP was not built with QuickGELU)
    x = torch.randn(2, 5, enc.dim)
    with torch.no_grad():
        blk = {k[len("transformer.resblocks.0."):]: v for k, v in clip_sd.items() if k.startswith("transformer.resblocks.0.")}
        torch.testing.assert_close(model.head.transformer[0](x), _reference_clip_block(x, blk, plan.heads, "gelu"))
        torch.testing.assert_close(model.head.transformer[0](x), enc.model.transformer.resblocks[0](x))


def test_seqtransf_init_rules_for_random_and_misfit_clip(tmp_path):
    from muse_pipeline.models.clip_init import ClipWeightsError, init_seqtransf, plan_seqtransf_init

    rnd = plan_seqtransf_init(model_name="muse-tiny", pretrained=None, weights_id="random-init", quick_gelu=False,
                              dim=64, layers=4, max_frames=12)
    assert not rnd.copy and "random-init" in rnd.note and rnd.act == "quick_gelu" and rnd.heads == 1
    wide = plan_seqtransf_init(model_name="ViT-B-32", pretrained="openai", weights_id="openai", quick_gelu=True,
                               dim=512, layers=4, max_frames=12)
    assert wide.copy and wide.heads == 8 and wide.act == "quick_gelu" and wide.copied_layers == 4
    # text width 512 != a 768-d embedding: random init with the reason recorded
    misfit = plan_seqtransf_init(model_name="ViT-B-32", pretrained="openai", weights_id="openai", quick_gelu=True,
                                 dim=768, layers=4, max_frames=12)
    assert not misfit.copy and "text width 512 != embed dim 768" in misfit.note
    too_many = plan_seqtransf_init(model_name="ViT-B-32", pretrained="openai", weights_id="openai", quick_gelu=True,
                                   dim=512, layers=4, max_frames=100)
    assert not too_many.copy and "77 text positions < 100 frames" in too_many.note
    # the console hears of the fallbacks for pretrained CLIP; random-init CLIP is a choice, only recorded
    assert rnd.warning is None and wide.warning is None
    for fallback in (misfit, too_many):
        assert fallback.warning.startswith("seqTransf starts from random init") and "\n" not in fallback.warning
    short = plan_seqtransf_init(model_name="muse-tiny", pretrained="tiny.pt", weights_id="0" * 64, quick_gelu=False,
                                dim=64, layers=4, max_frames=12)
    assert short.copy and short.copied_layers == 2
    assert short.warning == ("seqTransf layers 2-3 start from random init: CLIP muse-tiny has only 2 text layers "
                             "to copy (CLIP4Clip copies 4)")
    # the weights the cache names must be the ones loaded
    path, _ = _tiny_clip_file(tmp_path)
    plan = plan_seqtransf_init(model_name="muse-tiny", pretrained=str(path), weights_id="0" * 64, quick_gelu=False,
                               dim=64, layers=4, max_frames=12)
    head = build_head("seqTransf", 64, 7, 12, heads=plan.heads, act=plan.act)
    with pytest.raises(ClipWeightsError, match="is not the CLIP the cache was extracted with"):
        init_seqtransf(head, plan)
    gone = plan_seqtransf_init(model_name="muse-tiny", pretrained=str(tmp_path / "gone.pt"), weights_id="x",
                               quick_gelu=False, dim=64, layers=4, max_frames=12)
    with pytest.raises(ClipWeightsError, match="cannot be loaded"):
        init_seqtransf(head, gone)


def test_recipe_param_groups_per_head():
    """seqTransf at the base lr, fusion heads and the text adapter at 10x, logit_scale at the CLIP lr,
    no decay on biases / norms / A_log / D / logit_scale."""
    from muse_pipeline.models.params import param_table, recipe_lr_mult

    for head, head_lr in (("seqTransf", 1e-4), ("muse", 1e-3), ("muse-transformer", 1e-3)):
        kw = {"seqTransf": dict(transformer_layers=1), "muse": dict(depth=1, d_state=4)}.get(head, dict(depth=1))
        model = RetrievalModel(ModelConfig(head=head, dim=DIM, grid=3, max_frames=4, **kw))
        mult = recipe_lr_mult(lr=1e-4, head_lr_mult=10.0, clip_lr=1e-7, head_lr_group=model.head.LR_GROUP, prefix="")
        rows = {r["name"]: r for r in param_table(param_groups(model, 1e-4, 0.2, mult))}
        assert set(rows) == {n for n, _ in model.named_parameters()}
        for name, r in rows.items():
            expected_lr = 1e-7 if name == "logit_scale" else 1e-3 if name.startswith("text_adapter.") else (
                head_lr if name.startswith("head.") else 1e-4)
            assert r["lr"] == pytest.approx(expected_lr), name
            assert r["shape"] == list(dict(model.named_parameters())[name].shape)
        assert rows["logit_scale"]["weight_decay"] == 0.0 and rows["logit_scale"]["group"] == "logit_scale/no_decay"
