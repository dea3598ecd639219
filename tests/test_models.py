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


def test_bimamba_cpu_kernels_match_reference_gradients():
    # the default CPU path (numba scan + shifted conv) against reference=True (sequential scan +
    # F.conv1d): the gradients of every parameter and of the input
    torch.manual_seed(2)
    m = BiMamba(DIM, d_state=4).double()
    x = torch.randn(2, 70, DIM, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(2, 70, dtype=torch.bool)
    pad[1, 50:] = True
    gy = torch.randn(2, 70, DIM, dtype=torch.float64)
    grads = []
    for reference in (False, True):
        m.zero_grad()
        x.grad = None
        (m(x, pad, reference=reference) * gy).sum().backward()
        grads.append({"x": x.grad.clone(), **{n: p.grad.clone() for n, p in m.named_parameters()}})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-10, rtol=1e-10, msg=name)


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
    assert by_name["logit_scale"]["lr"] == pytest.approx(1e-4)
    assert by_name["head.fusion.blocks.0.mixer.in_proj.weight"]["weight_decay"] == 0.2
    torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6)  # the groups are a valid optimizer spec
