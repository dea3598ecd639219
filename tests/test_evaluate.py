"""Evaluate stage: embed-once on small real FeatureCache stores, with fake models of known behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from muse_pipeline.cache.store import FeatureCache
from muse_pipeline.data.base import CaptionItem, DatasetIndex, VideoItem
from muse_pipeline.errors import UserError
from muse_pipeline.evaluation import embed, end_to_end, score, tables
from muse_pipeline.metrics import retrieval_metrics
from muse_pipeline.stages import evaluate as ev

T, L, D = 3, 5, 8


def make_store(
    path: Path,
    tokens: np.ndarray,
    mask: np.ndarray,
    done: np.ndarray,
    split: list[str],
    text_emb: np.ndarray,
    text_video: np.ndarray,
    ids: list[str] | None = None,
    paths: list[str] | None = None,
    fingerprint: dict | None = None,
) -> FeatureCache:
    """A FeatureCache (one shard) holding exactly these tokens [N, T, L, D] and text embeddings [M, D]."""
    n, frames, num_tokens, dim = tokens.shape
    ids = ids or [f"v{i}" for i in range(n)]
    paths = paths or [f"/nowhere/v{i}.mp4" for i in range(n)]
    words = 8
    fingerprint = fingerprint or {"model": "fake", "weights": "random-init", "dim": dim, "words": words}
    index = DatasetIndex(
        "fake",
        Path("/nowhere"),
        tuple(VideoItem(ids[i], Path(paths[i]), split[i]) for i in range(n)),
        tuple(CaptionItem(f"caption {k}", int(v), split[int(v)]) for k, v in enumerate(text_video)),
    )
    cache = FeatureCache.create(
        path,
        index,
        frames=frames,
        num_tokens=num_tokens,
        dim=dim,
        words=int(fingerprint["words"]),
        fingerprint=fingerprint,
        videos_per_shard=n,
    )
    cache.write_shard_videos(0, tokens * mask[:, :, None, None], mask, done)
    cache.write_texts(0, embeddings=text_emb)
    return FeatureCache.open(path)


class CountingCache:
    """Wraps a FeatureCache and records every read_videos call."""

    def __init__(self, cache: FeatureCache) -> None:
        self._cache = cache
        self.reads: list[list[int]] = []

    def read_videos(self, indices):
        self.reads.append([int(i) for i in indices])
        return self._cache.read_videos(indices)

    def __getattr__(self, name: str):
        return getattr(self._cache, name)


def make_cache(
    tmp_path: Path, n_test: int = 7, n_train: int = 3, captions_per_video: int = 2, seed: int = 0, done=None
) -> CountingCache:
    """A store whose captions equal their video's CLS mean plus noise: zero-shot meanP ranks well."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    tokens = rng.normal(size=(n, T, L, D)).astype(np.float32)
    mask = np.ones((n, T), np.uint8)
    mask[1, 2] = 0
    split = ["train"] * n_train + ["test"] * n_test
    text_video = np.repeat(np.arange(n), captions_per_video)
    cls = tokens[:, :, 0, :] / np.linalg.norm(tokens[:, :, 0, :], axis=-1, keepdims=True)
    text_emb = cls.mean(1)[text_video] + 0.05 * rng.normal(size=(len(text_video), D))
    done = np.ones(n, np.uint8) if done is None else np.asarray(done, np.uint8)
    store = make_store(tmp_path / "cache.zarr", tokens, mask, done, split, text_emb, text_video)
    return CountingCache(store)


class CountingModel:
    """Linear 'head' on mean CLS; records how often every video/text row was embedded (by content)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(D, D, generator=g)
        self.video_calls = 0
        self.video_rows = 0
        self.text_rows = 0

    def embed_videos(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.video_calls += 1
        self.video_rows += tokens.shape[0]
        m = mask.float().unsqueeze(-1)
        x = (tokens[:, :, 0] * m).sum(1) / m.sum(1)
        return torch.nn.functional.normalize(x @ self.w, dim=-1)

    def embed_texts(self, text_emb: torch.Tensor) -> torch.Tensor:
        self.text_rows += text_emb.shape[0]
        return torch.nn.functional.normalize(text_emb.float() @ self.w, dim=-1)


def test_embed_split_embeds_each_video_and_text_once(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, n_test=7, n_train=3)
    model = CountingModel()
    video_emb, text_emb, c2v = embed.embed_split(model, cache, "test", batch_size=3)
    assert video_emb.shape == (7, D) and text_emb.shape == (14, D)
    assert model.video_rows == 7 and model.text_rows == 14
    assert model.video_calls == 3  # ceil(7 / 3) batched reads
    assert sorted(i for batch in cache.reads for i in batch) == list(range(3, 10))
    np.testing.assert_array_equal(c2v, np.repeat(np.arange(7), 2))


def test_embed_once_equals_per_pair_recompute(tmp_path: Path) -> None:
    # The upstream protocol reran the head for each (text batch, video batch) pair; same numbers.
    cache = make_cache(tmp_path, n_test=6, n_train=0)
    model = CountingModel()
    video_emb, text_emb, _ = embed.embed_split(model, cache, "test", batch_size=4)
    sim = embed.similarity_chunked(text_emb, video_emb, chunk=5)
    tokens_np, mask_np = cache.read_videos(np.arange(6))
    tokens, mask = torch.from_numpy(tokens_np.astype(np.float32)), torch.from_numpy(mask_np)
    texts = torch.from_numpy(cache.read_text_embeddings().astype(np.float32))
    ref = torch.empty(12, 6)
    for t0 in range(0, 12, 4):
        for v0 in range(0, 6, 4):
            t = model.embed_texts(texts[t0 : t0 + 4])
            v = model.embed_videos(tokens[v0 : v0 + 4], mask[v0 : v0 + 4])
            ref[t0 : t0 + 4, v0 : v0 + 4] = t @ v.T
    torch.testing.assert_close(sim, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_similarity_chunked_matches_matmul(chunk: int) -> None:
    g = torch.Generator().manual_seed(1)
    t, v = torch.randn(10, 4, generator=g), torch.randn(7, 4, generator=g)
    torch.testing.assert_close(embed.similarity_chunked(t, v, chunk), t @ v.T)
    with pytest.raises(ValueError, match="equal D"):
        embed.similarity_chunked(t, torch.randn(7, 5), chunk)


def test_failed_video_left_out_with_its_captions(tmp_path: Path) -> None:
    done = np.ones(7, np.uint8)
    done[4] = 2  # third test video failed extraction
    cache = make_cache(tmp_path, n_test=5, n_train=2, done=done)
    members = embed.split_members(cache, "test")
    np.testing.assert_array_equal(members.video_idx, [2, 3, 5, 6])
    assert members.failed_videos == 1 and members.dropped_texts == 2
    np.testing.assert_array_equal(members.caption_to_video, [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(members.text_idx, [4, 5, 6, 7, 10, 11, 12, 13])


def test_clear_errors(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    with pytest.raises(ValueError, match=r"split 'val' has no videos.*splits in this cache: test, train"):
        embed.split_members(cache, "val")
    done = np.ones(10, np.uint8)
    done[5] = 0
    pending = make_cache(tmp_path / "p", done=done)
    with pytest.raises(ValueError, match="not extracted yet"):
        embed.split_members(pending, "test")
    with pytest.raises(ValueError, match="unknown split"):
        embed.split_members(cache, "dev")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.evaluate_zero_shot(tmp_path / "missing.zarr")


def test_zero_shot_writes_eval_files(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, n_test=8, n_train=2)
    out = tmp_path / "zs"
    result = ev.evaluate_zero_shot(cache.path, out_dir=out, dsl=True)
    # Texts are their video's mean CLS plus small noise: zero-shot meanP must find them.
    assert result["metrics"]["t2v"]["R1"] == 100.0
    assert result["counts"] == {"videos": 8, "texts": 16, "failed_videos": 0, "dropped_texts": 0}
    saved = json.loads((out / "eval.json").read_text())
    assert saved["metrics"] == result["metrics"]
    assert saved["post_processing"].startswith("dual softmax")
    md = (out / "eval.md").read_text()
    assert "Without post-processing" in md and "Post-processed: dual softmax" in md
    # Same numbers through the generic metric on a brute-force similarity.
    model = embed.ZeroShotMeanP()
    v, t, c2v = embed.embed_split(model, cache, "test")
    assert retrieval_metrics(t @ v.T, c2v) == result["metrics"]


def test_eval_json_keeps_per_query_ranks_and_rsum(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, n_test=6, n_train=2, captions_per_video=3, seed=5)
    model = CountingModel()
    # A text side that differs from the video side: imperfect ranks, so the ranks carry information.
    w_text = model.w + 1.5 * torch.randn(D, D, generator=torch.Generator().manual_seed(1))
    model.embed_texts = lambda e: torch.nn.functional.normalize(e.float() @ w_text, dim=-1)
    result = score.evaluate_cached(model, cache, "test", False, "cpu", 4, 5)
    v, t, c2v = embed.embed_split(model, cache, "test")
    sim = (t @ v.T).numpy()
    # Brute force, straight from the definitions (not the metrics module).
    t2v = [1 + int((np.delete(sim[m], c2v[m]) >= sim[m, c2v[m]]).sum()) for m in range(len(c2v))]
    v2t = []
    for j in range(sim.shape[1]):
        own = [m for m in range(len(c2v)) if c2v[m] == j]
        v2t.append(min(1 + int((np.delete(sim[:, j], m) >= sim[m, j]).sum()) for m in own))
    pq = result["per_query"]
    assert pq["t2v"]["rank"] == t2v and pq["v2t"]["rank"] == v2t
    ids = cache.video_ids
    test_rows = [i for i, s in enumerate(cache.video_splits) if s == "test"]
    assert pq["t2v"]["video"] == [ids[test_rows[j]] for j in c2v]
    assert pq["v2t"]["video"] == [ids[i] for i in test_rows]
    assert pq["t2v"]["caption"][:3] == ["caption 6", "caption 7", "caption 8"]
    assert 1 < max(t2v) and min(t2v) == 1  # the test is not vacuous
    m = result["metrics"]
    assert result["rsum"] == pytest.approx(sum(m[d][k] for d in ("t2v", "v2t") for k in ("R1", "R5", "R10")))
    assert m["v2t"]["R1"] == pytest.approx(100 * np.mean(np.array(v2t) <= 1))
    md = tables.eval_markdown({**result, "head": "h", "run_dir": None, "weights": "w"})
    assert f"**{result['rsum']:.1f}**" in md and "best (smallest) rank among its own captions" in md
    assert "text -> video" in md and "video -> text" in md and "per_query" in md


def test_evaluate_run_with_fake_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import muse_pipeline.models.checkpoint as checkpoint

    cache = make_cache(tmp_path, n_test=6, n_train=2)
    run = tmp_path / "run"
    run.mkdir()
    config = {"model": {"head": "fake"}, "cache": str(cache.path), "fingerprint": cache.fingerprint}
    (run / "config.json").write_text(json.dumps(config))
    model = CountingModel()
    model.to = lambda device: model  # type: ignore[attr-defined]
    model.eval = lambda: model  # type: ignore[attr-defined]
    monkeypatch.setattr(checkpoint, "load_run", lambda run_dir, which="best": (model, config))
    result = ev.evaluate_run(run, split="test")
    assert result["head"] == "fake" and result["split"] == "test" and result["post_processing"] is None
    assert "metrics_dsl" not in result
    assert (run / "eval.json").is_file() and (run / "eval.md").is_file()
    assert model.video_rows == 6
    # A run trained on other CLIP weights is refused.
    config["fingerprint"] = {**cache.fingerprint, "weights": "openai"}
    with pytest.raises(ValueError, match="weights"):
        ev.evaluate_run(run)


def test_print_eval_renders(tmp_path: Path) -> None:
    from rich.console import Console

    metrics = {d: {"R1": 1.0, "R5": 2.0, "R10": 3.0, "MdR": 4.0, "MnR": 5.5} for d in ("t2v", "v2t")}
    result = {
        "head": "h",
        "split": "test",
        "counts": {"videos": 2, "texts": 2, "failed_videos": 1, "dropped_texts": 1},
        "metrics": metrics,
        "metrics_dsl": metrics,
        "post_processing": "dual softmax (DSL), temperature 0.01",
    }
    console = Console(record=True, width=120)
    tables.print_eval(result, console)
    text = console.export_text()
    assert "text -> video" in text and "post-processed" in text and "5.5" in text and "failed" in text
    assert "RSum 12.0" in text and "best (smallest) rank among its own captions" in text


# --------------------------------------------------------------------------------------------------
# Report (stages/report.py, evaluation/plots.py, training/metrics_log.py): plots read metrics.jsonl and eval.json.


def _fake_run(root: Path, name: str, head: str, r1: float, with_eval: bool = True) -> Path:
    run = root / name
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"head": head}}))
    lines = []
    for epoch in range(3):
        for s in range(4):
            lines.append(
                {"kind": "step", "step": epoch * 4 + s + 1, "epoch": epoch, "loss": 3.0 - 0.2 * s, "lr": 1e-3}
            )
        val = {"t2v": {"R1": r1 + epoch, "R5": 50.0, "R10": 60.0, "MdR": 3.0, "MnR": 9.0}}
        lines.append({"kind": "epoch", "epoch": epoch, "train_loss": 2.7 - 0.1 * epoch, "val": val})
    text = "\n".join(json.dumps(x) for x in lines) + '\n{"kind": "step", "st'  # torn last line
    (run / "metrics.jsonl").write_text(text)
    if with_eval:
        m = {d: {"R1": r1, "R5": r1 + 20, "R10": r1 + 30, "MdR": 2.0, "MnR": 10.0} for d in ("t2v", "v2t")}
        (run / "eval.json").write_text(json.dumps({"head": head, "split": "test", "metrics": m}))
    return run


def test_report_writes_pngs(tmp_path: Path) -> None:
    from muse_pipeline.stages.report import write_report
    from muse_pipeline.training.metrics_log import read_metrics_log

    a = _fake_run(tmp_path, "a", "muse", 40.0)
    b = _fake_run(tmp_path, "b", "meanP", 35.0)
    c = _fake_run(tmp_path, "c", "seqTransf", 30.0, with_eval=False)
    steps, epochs = read_metrics_log(a / "metrics.jsonl")
    assert len(steps) == 12 and len(epochs) == 3
    base = tmp_path / "zs.json"
    zs = {d: {"R1": 5.0, "R5": 15.0, "R10": 25.0, "MdR": 20.0, "MnR": 30.0} for d in ("t2v", "v2t")}
    base.write_text(json.dumps({"head": "zero-shot meanP", "metrics": zs}))
    files = write_report([a, b, c], tmp_path / "report", baseline=base)
    assert [p.name for p in files] == ["training.png", "training.svg", "recall.png", "recall.svg"]
    from PIL import Image

    for p in files[::2]:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        dpi = Image.open(p).info["dpi"]
        assert round(dpi[0]) == 200
    assert Image.open(files[2]).size[0] > 1500  # 200 dpi
    svg = files[3].read_text()
    # One legend entry per run (+ the baseline), both directions, the baseline bar's values.
    for label in ("a (muse)", "b (meanP)", "zero-shot meanP (baseline)", "text -&gt; video", "video -&gt; text"):
        assert label in svg, label
    assert svg.count("a (muse)") == 1
    training = files[1].read_text()
    assert training.count("a (muse)") == 1 and training.count("c (seqTransf)") == 1
    assert "best: epoch 2" in training  # R@1 rises every epoch: the last (0-based 2) is best
    with pytest.raises(ValueError, match="baseline eval file"):
        write_report([a], tmp_path / "r2", baseline=tmp_path / "none.json")


def test_report_computes_the_zero_shot_baseline_from_the_runs_cache(tmp_path: Path) -> None:
    from muse_pipeline.stages.report import write_report

    cache = make_cache(tmp_path, n_test=4, n_train=1)
    run = _fake_run(tmp_path, "a", "muse", 40.0)
    result = json.loads((run / "eval.json").read_text())
    (run / "eval.json").write_text(json.dumps({**result, "cache": str(cache.path)}))
    files = write_report([run], tmp_path / "report")
    svg = files[3].read_text()
    assert "zero-shot CLIP (meanP, no training)" in svg
    zs = ev.evaluate_zero_shot(cache.path)["metrics"]["t2v"]["R1"]  # 100.0: texts are their video's CLS
    assert f"{zs:.1f}" in svg
    files = write_report([run], tmp_path / "report2", baseline=False)
    assert "zero-shot" not in files[3].read_text()


def test_report_errors(tmp_path: Path) -> None:
    from muse_pipeline.stages.report import write_report
    from muse_pipeline.training.metrics_log import read_metrics_log, val_r1

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="nothing to plot"):
        write_report([empty], tmp_path / "out")
    with pytest.raises(ValueError, match="not a directory"):
        write_report([tmp_path / "missing"], tmp_path / "out")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "step"\n{"kind": "epoch", "epoch": 0}\n')
    with pytest.raises(UserError, match="line 1"):  # one error line for the CLI, no traceback
        read_metrics_log(bad)
    damaged = _fake_run(tmp_path, "damaged", "muse", 40.0)
    (damaged / "eval.json").write_text('{"head": "muse", "split"')
    with pytest.raises(UserError, match="eval.json"):
        write_report([damaged], tmp_path / "out-damaged")
    assert not (tmp_path / "out-damaged").exists()  # refused before anything is written
    assert val_r1({"R1": 5}) == 5.0 and val_r1({"t2v": {"R1": 7}}) == 7.0 and val_r1(None) is None


def test_cli_eval_zero_shot_and_report(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from muse_pipeline.cli.evaluate import eval_cmd
    from muse_pipeline.cli.report import report_cmd

    app = typer.Typer()
    app.command("eval")(eval_cmd)
    app.command("report")(report_cmd)
    cache = make_cache(tmp_path, n_test=4, n_train=1)
    out = tmp_path / "zs"
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--zero-shot", "--cache", str(cache.path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "text -> video" in res.output and (out / "eval.json").is_file()
    res = runner.invoke(app, ["eval", "--zero-shot"])
    assert res.exit_code == 1 and "--cache" in res.output
    res = runner.invoke(app, ["eval", "--zero-shot", "--cache", str(cache.path), "--split", "val"])
    assert res.exit_code == 1 and "no videos" in res.output
    from muse_pipeline.cli.main import app as muse

    res = runner.invoke(muse, ["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and "error: not a directory" in res.output


def _real_meanp_run(
    tmp_path: Path, cache_path: Path, fingerprint: dict, dim: int, grid: int, frames: int
) -> Path:
    """A run directory with a real (untrained) meanP RetrievalModel: equal to zero-shot CLIP."""
    pytest.importorskip("muse_pipeline.models.heads", reason="needs the heads module of the models helper")
    from muse_pipeline.models.checkpoint import save_run_weights
    from muse_pipeline.models.retrieval import ModelConfig, RetrievalModel

    cfg = ModelConfig(head="meanP", dim=dim, grid=grid, max_frames=frames)
    run = tmp_path / "meanp-run"
    run.mkdir()
    model = RetrievalModel(cfg)
    save_run_weights(run, "best", model)
    config = {"model": cfg.to_dict(), "train": {}, "cache": str(cache_path), "fingerprint": fingerprint}
    (run / "config.json").write_text(json.dumps(config))
    return run


def test_integration_real_model_meanp_equals_zero_shot(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, n_test=9, n_train=2, seed=3)
    run = _real_meanp_run(tmp_path, cache.path, cache.fingerprint, D, 2, T)
    trained = ev.evaluate_run(run, dsl=True)
    zero = ev.evaluate_zero_shot(cache.path, dsl=True)
    # The text adapter starts at zero and meanP has no parameters: the same embeddings.
    assert trained["metrics"] == zero["metrics"]
    assert trained["metrics_dsl"] == zero["metrics_dsl"]
    assert trained["head"] == "meanP" and json.loads((run / "eval.json").read_text())["counts"]["videos"] == 9


def test_end_to_end_run_decodes_with_its_own_clip(tmp_path: Path, synthetic_root: Path) -> None:
    from muse_pipeline.data import load_dataset
    from muse_pipeline.encoders.clip import ClipEncoder
    from muse_pipeline.models.checkpoint import save_run_weights
    from muse_pipeline.models.retrieval import ModelConfig, RetrievalModel
    from muse_pipeline.video.decode import decode_clip
    from muse_pipeline.video.transforms import preprocess_frames

    frames, words = 3, 16
    enc = ClipEncoder("muse-tiny")
    with torch.no_grad():  # "fine-tuned" CLIP: differs from the seeded random init the source names
        enc.model.visual.proj.add_(0.05 * torch.randn_like(enc.model.visual.proj))
    cfg = ModelConfig(head="meanP", dim=enc.dim, grid=enc.grid, max_frames=frames)
    run = tmp_path / "e2e"
    run.mkdir()
    save_run_weights(run, "best", RetrievalModel(cfg), clip=enc.model)
    source = {
        "dataset": "synthetic",
        "data_root": str(synthetic_root),
        "model": "muse-tiny",
        "pretrained": None,
    }
    config = {
        "model": cfg.to_dict(),
        "train": {"frames": frames, "words": words},
        "cache": None,
        "fingerprint": {"words": words},
        "end_to_end": True,
        "end_to_end_source": {**source, "decoder": "pyav"},
    }
    (run / "config.json").write_text(json.dumps(config))

    loaded = end_to_end.load_end_to_end_encoder(run, config)
    assert torch.equal(loaded.model.visual.proj, enc.model.visual.proj)
    result = ev.evaluate_run(run)
    assert result["cache"] is None and "end-to-end" in result["source"]
    assert "source: end-to-end" in (run / "eval.md").read_text()

    # Brute force: decode, encode with the fine-tuned CLIP, meanP, cosine, metrics.
    index = load_dataset("synthetic", synthetic_root)
    test = [i for i, v in enumerate(index.videos) if v.split == "test"]
    caps = [c for c in index.captions if c.video_index in test]
    vids = []
    for i in test:
        v = index.videos[i]
        px = preprocess_frames(decode_clip(v.path, frames, v.start, v.end), enc.image_size, enc.mean, enc.std)
        cls = torch.nn.functional.normalize(enc.encode_frames(px)[:, 0], dim=-1)
        vids.append(torch.nn.functional.normalize(cls.mean(0), dim=-1))
    txt = torch.nn.functional.normalize(enc.encode_texts(enc.tokenize([c.text for c in caps], words)), dim=-1)
    c2v = np.array([test.index(c.video_index) for c in caps])
    assert result["counts"]["videos"] == len(test) and result["counts"]["texts"] == len(caps)
    model = RetrievalModel(cfg).eval()
    v_emb, t_emb, got_c2v, failures = end_to_end.embed_split_end_to_end(model, loaded, index, "test", frames, words)
    torch.testing.assert_close(v_emb, torch.stack(vids), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t_emb, txt, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got_c2v, c2v)
    assert failures == 0
    assert result["metrics"] == retrieval_metrics(t_emb @ v_emb.T, c2v)

    with pytest.raises(ValueError, match="end-to-end"):
        ev.evaluate_run(run, cache_path=tmp_path / "any.zarr")
