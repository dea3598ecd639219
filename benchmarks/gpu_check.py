"""`make gpu-check`: everything that needs a real card, in one call, as ONE markdown table (< 8 min on an H100).

    python benchmarks/gpu_check.py [--out gpu-check.md]     # on a CUDA machine
    python benchmarks/gpu_check.py --quick                  # CPU, tiny sizes: tests this script itself

Rows:
- environment: card, torch / CUDA versions, whether mamba_ssm / causal_conv1d import;
- CUDA kernel tests (tests/test_cuda_kernels.py), float32 and bf16: the real kernels against the torch
  paths through the project's dispatch;
- BiMamba CUDA vs torch path (D=512, L=600 with padding), float32 and bf16 autocast: output and
  gradient differences at real tokens;
- one from-cache training epoch on a synthetic MSR-VTT-sized cache (9,000 videos of random
  [12, 50, 512] float16 tokens, 20 captions each = 180k pairs, batch 128, paper-size `muse` head, bf16,
  `--cache-memory auto`), run for at most a time budget: steps/s, the projected epoch time (goal
  < 120 s) and the share of time spent waiting for data;
- `muse` vs `muse-transformer`, one forward+backward (B=8, D=512, bf16) at T = 12, 32, 64: time and
  peak memory (OOM is reported as such);
- ViT-B/32 extraction (random init: the machine is offline) of synthetic videos through the extract
  stage, in-process, `--device cuda`: frames/s (goal: MSR-VTT's 120k frames in < 3 min = 667 frames/s);
- a 1k x 1k evaluation (paper-size `muse`) through the eval stage: seconds (goal < 5 s).
Each row is measured in its own try/except: a failure becomes a FAIL row with its one-line reason.
A global deadline leaves later rows a SKIP instead of overrunning.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one mode (full: the issue's; quick: tiny, CPU)."""

    device: str
    deadline_s: float
    kernel_tests_timeout_s: float
    bimamba_dim: int
    bimamba_len: int
    train_videos: int
    train_captions: int
    frames: int
    grid: int
    dim: int
    batch: int
    head: dict
    train_budget_s: float
    train_max_steps: int
    fusion_frames: tuple[int, ...]
    fusion_batch: int
    extract_videos: int
    extract_model: str
    eval_videos: int


FULL = Sizes(device="cuda", deadline_s=420, kernel_tests_timeout_s=150, bimamba_dim=512, bimamba_len=600,
             train_videos=9000, train_captions=20, frames=12, grid=7, dim=512, batch=128, head={},
             train_budget_s=75, train_max_steps=400, fusion_frames=(12, 32, 64), fusion_batch=8,
             extract_videos=48, extract_model="ViT-B-32", eval_videos=1000)
QUICK = Sizes(device="cpu", deadline_s=150, kernel_tests_timeout_s=90, bimamba_dim=16, bimamba_len=12,
              train_videos=24, train_captions=2, frames=3, grid=2, dim=16, batch=8,
              head={"depth": 1, "d_state": 4, "scales": (1.0,)}, train_budget_s=5, train_max_steps=3,
              fusion_frames=(2,), fusion_batch=1, extract_videos=2, extract_model="muse-tiny", eval_videos=16)


class Table:
    """Rows of | check | status | result | detail |; each `row` block turns an exception into FAIL."""

    def __init__(self, deadline: float) -> None:
        self.rows: list[tuple[str, str, str, str]] = []
        self.deadline = deadline

    def add(self, check: str, status: str, result: str = "", detail: str = "") -> None:
        self.rows.append((check, status, result, detail))

    @contextlib.contextmanager
    def row(self, check: str, needs_s: float = 0.0):
        """Yields a dict to fill with status/result/detail (status PASS unless set)."""
        cell: dict[str, str] = {}
        left = self.deadline - time.monotonic()
        if left < needs_s:
            self.add(check, "SKIP", "", f"time budget: {left:.0f} s left, this check needs ~{needs_s:.0f} s")
            yield None
            return
        start = time.monotonic()
        try:
            yield cell
        except Exception as exc:  # noqa: BLE001 - one failing check must not kill the table
            cell = {"status": "FAIL", "result": "", "detail": one_line(exc)}
        finally:
            if cell is not None:
                secs = time.monotonic() - start
                detail = cell.get("detail", "")
                self.add(check, cell.get("status", "PASS"), cell.get("result", ""),
                         f"{detail}{'; ' if detail else ''}{secs:.0f} s")

    def markdown(self, title: str) -> str:
        lines = [title, "", "| check | status | result | detail |", "| --- | --- | --- | --- |"]
        for r in self.rows:
            lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in r) + " |")
        return "\n".join(lines) + "\n"


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ checks
def check_kernel_tests(table: Table, sizes: Sizes) -> None:
    """One pytest run of tests/test_cuda_kernels.py; one row per dtype from the per-test outcomes."""
    outcomes: dict[str, tuple[str, str]] = {}  # test id -> (outcome, reason)
    needs = 20 if sizes.device == "cpu" else 60
    with table.row("CUDA kernel tests (pytest run)", needs) as cell:
        if cell is None:
            return
        cmd = [sys.executable, "-m", "pytest", "tests/test_cuda_kernels.py", "-v", "-rA", "-p", "no:cacheprovider"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=sizes.kernel_tests_timeout_s)
        out = proc.stdout + proc.stderr
        for name, outcome, why in re.findall(r"^tests/test_cuda_kernels\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR)"
                                             r"(?: \((.*)\))?", out, re.M):
            outcomes[name] = (outcome, why)
        for outcome, name, why in re.findall(r"^(FAILED|ERROR) tests/test_cuda_kernels\.py::(\S+) - (.*)$", out, re.M):
            outcomes[name] = (outcome, why)
        reasons = re.findall(r"^SKIPPED \[\d+\] tests/test_cuda_kernels\.py:\d+: (.*)$", out, re.M)
        for name, (outcome, why) in outcomes.items():
            if outcome == "SKIPPED" and not why and reasons:
                outcomes[name] = (outcome, reasons[0])
        summary = re.findall(r"\d+ (?:passed|failed|skipped|errors?)", out)
        ok = proc.returncode == 0 or (proc.returncode == 5 and not outcomes)
        cell.update(status="PASS" if ok else "FAIL", result=", ".join(summary) or f"exit {proc.returncode}")
        if not outcomes:
            cell["detail"] = (out.strip().splitlines() or [""])[-1][:200]
    for label in ("float32", "bf16"):
        mine = {name: v for name, v in outcomes.items() if label in name}
        if not mine:
            continue
        bad = [f"{name}: {why}" for name, (o, why) in mine.items() if o in ("FAILED", "ERROR")]
        skipped = [why for o, why in mine.values() if o == "SKIPPED"]
        passed = sum(o == "PASSED" for o, _ in mine.values())
        status = "FAIL" if bad else ("SKIP" if passed == 0 else "PASS")
        detail = "; ".join(bad)[:300] if bad else (skipped[0] if skipped else "")
        table.add(f"CUDA kernel tests, {label}", status,
                  f"{passed} passed, {len(bad)} failed, {len(skipped)} skipped", detail)


def check_bimamba(table: Table, sizes: Sizes, precision: str) -> None:
    """The kernel dispatch (MUSE_SCAN=mamba_ssm) against MUSE_SCAN=torch / MUSE_CONV=torch on one BiMamba."""
    with table.row(f"BiMamba CUDA vs torch path, {precision}", 10) as cell:
        if cell is None:
            return
        import torch

        from muse_pipeline.models.backends import kernel_backends
        from muse_pipeline.models.bimamba import BiMamba

        dev = torch.device(sizes.device)
        backends = kernel_backends(dev)
        if backends["scan"] != "mamba_ssm":
            cell.update(status="SKIP", detail=f"no kernel path on {dev} (scan backend: {backends['scan']})")
            return
        torch.manual_seed(0)
        m = BiMamba(sizes.bimamba_dim).to(dev)
        x = torch.randn(4, sizes.bimamba_len, sizes.bimamba_dim, device=dev)
        pad = torch.zeros(4, sizes.bimamba_len, dtype=torch.bool, device=dev)
        pad[1, sizes.bimamba_len * 3 // 4 :] = True
        pad[3, sizes.bimamba_len // 3 :] = True
        amp = precision != "float32"

        def run(scan: str, conv: str):
            os.environ["MUSE_SCAN"], os.environ["MUSE_CONV"] = scan, conv
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                y = m(x, pad)
            grads = torch.autograd.grad(y[~pad].float().square().mean(), list(m.parameters()))
            return y[~pad].float(), grads

        try:
            y_k, g_k = run("mamba_ssm", "auto")
            y_t, g_t = run("torch", "torch")
        finally:
            os.environ.pop("MUSE_SCAN", None)
            os.environ.pop("MUSE_CONV", None)
        rel_y = float((y_k - y_t).norm() / y_t.norm())
        rel_g = max(float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
                    for a, b in zip(g_k, g_t, strict=True))
        limit_y, limit_g = (1e-4, 1e-3) if not amp else (2e-2, 5e-2)
        ok = rel_y < limit_y and rel_g < limit_g
        cell.update(status="PASS" if ok else "FAIL",
                    result=f"rel. diff output {rel_y:.1e}, worst gradient {rel_g:.1e}",
                    detail=f"limits {limit_y:g} / {limit_g:g}; conv backend {backends['conv']}")


def _synthetic_cache(path: Path, n_videos: int, captions: int, frames: int, tokens: int, dim: int,
                     split: str = "train", seed: int = 0) -> Path:
    """A complete feature cache of random tokens (all frames real), `captions` random texts per video."""
    import numpy as np

    from muse_pipeline.cache.store import FeatureCache
    from muse_pipeline.data.base import CaptionItem, DatasetIndex, VideoItem

    videos = tuple(VideoItem(f"v{i}", Path(f"v{i}.mp4"), split) for i in range(n_videos))
    caps = tuple(CaptionItem(f"c{i}.{j}", i, split) for i in range(n_videos) for j in range(captions))
    fp = {"dataset": "msrvtt-synthetic", "model": "random", "weights": "random-init", "frames": frames,
          "words": 32, "num_tokens": tokens, "dim": dim}
    cache = FeatureCache.create(path, DatasetIndex("synthetic", path.parent, videos, caps), frames=frames,
                                num_tokens=tokens, dim=dim, words=32, fingerprint=fp)
    rng = np.random.default_rng(seed)
    # a few random blocks, rotated over the shards: random tokens without generating 2.8 G values
    s = cache.videos_per_shard
    blocks = [rng.standard_normal((s, frames, tokens, dim), dtype=np.float32).astype(np.float16) for _ in range(3)]
    for k in range(cache.n_shards):
        lo, hi = cache.shard_range(k)
        cache.write_shard_videos(lo, blocks[k % 3][: hi - lo], np.ones((hi - lo, frames), np.uint8),
                                 np.ones(hi - lo, np.uint8))
    m = len(caps)
    for lo in range(0, m, 65536):
        hi = min(m, lo + 65536)
        cache.write_texts(lo, embeddings=rng.standard_normal((hi - lo, dim), dtype=np.float32).astype(np.float16))
    return path


def _model_config(sizes: Sizes, head: str = "muse"):
    from muse_pipeline.models.retrieval import ModelConfig

    return ModelConfig(head=head, dim=sizes.dim, grid=sizes.grid, max_frames=sizes.frames, **sizes.head)


def check_training(table: Table, sizes: Sizes, work: Path) -> None:
    label = (f"from-cache epoch: {sizes.train_videos} videos x {sizes.train_captions} captions, "
             f"batch {sizes.batch}, muse, {'bf16' if sizes.device == 'cuda' else 'float32'}")
    with table.row(label, 5 if sizes.device == "cpu" else 150) as cell:
        if cell is None:
            return
        import torch

        from muse_pipeline.models.backends import kernel_backends
        from muse_pipeline.models.retrieval import RetrievalModel
        from muse_pipeline.training.config import TrainConfig
        from muse_pipeline.training.data import cache_dataset, make_loader, open_cache_arrays, plan_splits
        from muse_pipeline.training.distributed import DistContext
        from muse_pipeline.training.loop import Trainer
        from muse_pipeline.training.modules import CachePairModel

        dev = torch.device(sizes.device)
        t0 = time.monotonic()
        path = _synthetic_cache(work / "msrvtt-synthetic.zarr", sizes.train_videos, sizes.train_captions,
                                sizes.frames, 1 + sizes.grid**2, sizes.dim)
        build_s = time.monotonic() - t0
        arrays = open_cache_arrays(path)
        plan = plan_splits(arrays.video_ids, arrays.video_split, arrays.video_done, arrays.text_video, 0.0)
        t0 = time.monotonic()
        dataset, memory = cache_dataset(arrays, plan.train_texts, "auto", dev)
        load_s = time.monotonic() - t0
        torch.manual_seed(0)
        pair = CachePairModel(RetrievalModel(_model_config(sizes)))
        cfg = TrainConfig(batch_size=sizes.batch, epochs=1, amp=True, num_workers=2)
        trainer = Trainer(pair, dataset, cfg, DistContext(0, 1, 0, dev), work / "run", lambda p: None, quiet=True)
        trainer.sampler.set_epoch(0)
        loader = make_loader(dataset, trainer.sampler, cfg.num_workers, pin_memory=dev.type == "cuda")
        warmup = 2
        data_s = compute_s = 0.0
        steps = 0
        start = time.monotonic()
        last = time.monotonic()
        for batch in loader:
            got = time.monotonic()
            trainer.train_step(batch, False)  # the trainer's own step: autocast, loss, clip, AdamW
            _sync(dev)
            done = time.monotonic()
            steps += 1
            if steps <= warmup:
                # the budget starts after the warm-up steps: a cold numba cache (fresh clone) or
                # CUDA's autotuning can take longer than the whole budget of a --quick run
                start = done
            else:
                data_s += got - last
                compute_s += done - got
            last = done
            if steps > warmup and (steps >= sizes.train_max_steps or done - start > sizes.train_budget_s):
                break
        timed = steps - warmup
        if timed < 1:
            raise RuntimeError(f"only {steps} steps ran within the budget")
        rate = timed / (data_s + compute_s)
        epoch_s = trainer.steps_per_epoch / rate
        backends = kernel_backends(dev)
        goal = "" if dev.type == "cpu" else ("; goal < 120 s: " + ("met" if epoch_s < 120 else "MISSED"))
        del loader
        cell.update(
            status="PASS",
            result=f"{rate:.2f} steps/s, epoch ({trainer.steps_per_epoch} steps) ~{epoch_s:.0f} s",
            detail=(f"data wait {data_s / (data_s + compute_s):.0%} of step time; {timed} timed steps; "
                    f"cache memory {memory.mode} (load {load_s:.0f} s); scan {backends['scan']}, conv "
                    f"{backends['conv']}; cache built in {build_s:.0f} s{goal}"),
        )
        del dataset, trainer, pair
        shutil.rmtree(path, ignore_errors=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def check_fusion(table: Table, sizes: Sizes) -> None:
    """One forward+backward of each head per T; in-process, peak memory from the CUDA allocator."""
    import torch

    from muse_pipeline.models.heads import build_head

    dev = torch.device(sizes.device)
    for t in sizes.fusion_frames:
        with table.row(f"muse vs muse-transformer, T={t}", 5 if dev.type == "cpu" else 25) as cell:
            if cell is None:
                continue
            cells = {}
            for head_name in ("muse", "muse-transformer"):
                try:
                    cells[head_name] = _fusion_step(build_head, head_name, sizes, t, dev)
                except torch.cuda.OutOfMemoryError:
                    cells[head_name] = None
                finally:
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()

            def fmt(r):
                if r is None:
                    return "OOM"
                mem = f", peak {r[1]:.0f} MiB" if r[1] is not None else ""
                return f"{r[0] * 1e3:.0f} ms{mem}"

            m, tr = cells["muse"], cells["muse-transformer"]
            ratio = f"; time ratio T/M {tr[0] / m[0]:.2f}" if m and tr else ""
            cell.update(result=f"muse {fmt(m)}; muse-transformer {fmt(tr)}",
                        detail=f"B={sizes.fusion_batch}, D={sizes.dim}, grid {sizes.grid}{ratio}",
                        status="PASS" if m is not None else "FAIL")


def _fusion_step(build_head, name: str, sizes: Sizes, t: int, dev) -> tuple[float, float | None]:
    import torch

    torch.manual_seed(0)
    head = build_head(name, sizes.dim, sizes.grid, t).to(dev).train()
    with torch.no_grad():  # zero-init out_fc would skip the mixers' backward: give them weights
        for pname, p in head.named_parameters():
            if "out_fc" in pname:
                p.normal_(0, 0.02)
    tokens = torch.randn(sizes.fusion_batch, t, 1 + sizes.grid**2, sizes.dim, device=dev)
    mask = torch.ones(sizes.fusion_batch, t, dtype=torch.bool, device=dev)

    def step():
        head.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = head(tokens, mask)
        out.float().sum().backward()
        _sync(dev)

    peak = None
    if dev.type == "cuda":
        _sync(dev)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        step()
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0, peak


def check_extraction(table: Table, sizes: Sizes, work: Path) -> None:
    with table.row(f"extraction, {sizes.extract_model} (random init), synthetic videos", 10 if sizes.device == "cpu" else 60) as cell:
        if cell is None:
            return
        from muse_pipeline.data.synthetic import generate_synthetic
        from muse_pipeline.stages.extract import run_extract

        root = generate_synthetic(work / "videos", n_videos=sizes.extract_videos, seed=0)
        summary = run_extract(dataset="synthetic", data_root=root, out=work / "extract.zarr", model=sizes.extract_model,
                              pretrained=None, frames=sizes.frames if sizes.device == "cpu" else 12,
                              device=sizes.device, workers=0, quiet=True)
        fps = summary.frames_encoded / max(summary.seconds, 1e-9)
        goal = "" if sizes.device == "cpu" else f"; goal >= 667 frames/s: {'met' if fps >= 667 else 'MISSED'}"
        cell.update(status="PASS" if summary.n_failed == 0 else "FAIL",
                    result=f"{fps:.0f} frames/s",
                    detail=f"{summary.frames_encoded} frames of {summary.n_cached} videos in {summary.seconds:.1f} s "
                           f"(model load included), {summary.n_failed} failed{goal}")


def check_evaluation(table: Table, sizes: Sizes, work: Path) -> None:
    n = sizes.eval_videos
    with table.row(f"evaluation {n} x {n}, muse", 5 if sizes.device == "cpu" else 30) as cell:
        if cell is None:
            return
        import torch

        from muse_pipeline.cache.store import FeatureCache
        from muse_pipeline.evaluation.score import evaluate_cached
        from muse_pipeline.models.retrieval import RetrievalModel

        path = _synthetic_cache(work / "eval.zarr", n, 1, sizes.frames, 1 + sizes.grid**2, sizes.dim, split="test",
                                seed=1)
        torch.manual_seed(0)
        model = RetrievalModel(_model_config(sizes)).to(sizes.device).eval()
        cache = FeatureCache.open(path)
        t0 = time.perf_counter()
        result = evaluate_cached(model, cache, "test", False, sizes.device, 128, 4096)
        secs = time.perf_counter() - t0
        parts = ", ".join(f"{k} {v:.2f}" for k, v in result["seconds"].items())
        goal = "" if sizes.device == "cpu" else f"; goal < 5 s: {'met' if secs < 5 else 'MISSED'}"
        cell.update(status="PASS", result=f"{secs:.2f} s", detail=f"{parts} s{goal}")


# -------------------------------------------------------------------------------------------- main
def environment(table: Table, sizes: Sizes) -> str:
    import torch

    kernels = ", ".join(f"{m} {'yes' if importlib.util.find_spec(m) else 'no'}" for m in ("mamba_ssm", "causal_conv1d"))
    if sizes.device == "cuda":
        card = f"{torch.cuda.get_device_name(0)} (sm {'.'.join(map(str, torch.cuda.get_device_capability(0)))})"
    else:
        card = "CPU (--quick)"
    table.add("environment", "INFO", card, f"torch {torch.__version__}, CUDA {torch.version.cuda}, {kernels}")
    return card


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU, tiny sizes: checks this script, not a card")
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch space (default: a temp dir)")
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    logging.basicConfig(level=logging.WARNING)
    start = time.monotonic()
    table = Table(start + sizes.deadline_s)
    import torch

    if sizes.device == "cuda" and not torch.cuda.is_available():
        table.add("environment", "FAIL", "no CUDA device", "torch.cuda.is_available() is False; use --quick on CPU")
        return _finish(table, "gpu-check", args.out, 2)
    card = environment(table, sizes)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=args.workdir))
    try:
        check_kernel_tests(table, sizes)
        for precision in ("float32", "bf16 autocast"):
            check_bimamba(table, sizes, precision)
        check_training(table, sizes, work)
        check_fusion(table, sizes)
        check_extraction(table, sizes, work)
        check_evaluation(table, sizes, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = time.monotonic() - start
    code = 1 if any(r[1] == "FAIL" for r in table.rows) else 0
    return _finish(table, f"gpu-check on {card}: {total:.0f} s", args.out, code)


def _finish(table: Table, title: str, out: Path | None, code: int) -> int:
    text = table.markdown(f"## {title}")
    print(text, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
