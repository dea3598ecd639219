"""Evaluation cost: embed-once (ours, spec section 8) vs the upstream per-pair recompute.

Upstream reruns the fusion head on a video batch for every (text batch, video batch) pair, so each
video is embedded ceil(M / text_batch) times. Ours embeds each video once and each text once, then
builds one similarity matrix. Same model, same random tokens; the script checks that both give the
same [M, N] similarity matrix and prints a markdown table with the measured ratio.

    .venv/bin/python benchmarks/eval.py --videos 256 --texts 256 --head muse
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from muse_pipeline.evaluation.embed import similarity_chunked
from muse_pipeline.models.retrieval import ModelConfig, RetrievalModel


@torch.inference_mode()
def embed_once(model: RetrievalModel, tokens, mask, texts, batch: int) -> tuple[torch.Tensor, int]:
    """[M, N] similarity with every video and every text embedded once; returns (sim, head runs)."""
    videos = [
        model.embed_videos(tokens[i : i + batch], mask[i : i + batch]) for i in range(0, len(tokens), batch)
    ]
    text = [model.embed_texts(texts[i : i + batch]) for i in range(0, len(texts), batch)]
    return similarity_chunked(torch.cat(text), torch.cat(videos)), len(videos)


@torch.inference_mode()
def per_pair(model: RetrievalModel, tokens, mask, texts, batch: int) -> tuple[torch.Tensor, int]:
    """The upstream loop: for each text batch, for each video batch, run the head again."""
    sim = torch.empty(len(texts), len(tokens))
    runs = 0
    for t0 in range(0, len(texts), batch):
        t = model.embed_texts(texts[t0 : t0 + batch])
        for v0 in range(0, len(tokens), batch):
            v = model.embed_videos(tokens[v0 : v0 + batch], mask[v0 : v0 + batch])
            runs += 1
            sim[t0 : t0 + batch, v0 : v0 + batch] = t @ v.T
    return sim, runs


def timed(fn, *args) -> tuple[float, torch.Tensor, int]:
    t0 = time.perf_counter()
    sim, runs = fn(*args)
    return time.perf_counter() - t0, sim, runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=256)
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--batch", type=int, default=64, help="videos / texts per forward pass (both protocols)")
    p.add_argument("--head", default="muse")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--grid", type=int, default=4)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = ModelConfig(head=args.head, dim=args.dim, grid=args.grid, max_frames=args.frames, depth=args.depth)
    model = RetrievalModel(cfg).to(args.device).eval()
    # Non-trivial weights: the zero-initialised residual outputs would make the head an identity.
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2 and not param.abs().any():
                param.normal_(0, 0.02)
    n, m, L = args.videos, args.texts, 1 + args.grid * args.grid
    tokens = torch.randn(n, args.frames, L, args.dim, device=args.device).half()
    mask = torch.ones(n, args.frames, dtype=torch.bool, device=args.device)
    real = torch.randint(1, args.frames + 1, (n,), device=args.device)
    mask &= torch.arange(args.frames, device=args.device)[None, :] < real[:, None]
    texts = torch.randn(m, args.dim, device=args.device).half()

    embed_once(model, tokens[: args.batch], mask[: args.batch], texts[: args.batch], args.batch)  # warm-up
    t_once, sim_once, runs_once = timed(embed_once, model, tokens, mask, texts, args.batch)
    t_pair, sim_pair, runs_pair = timed(per_pair, model, tokens, mask, texts, args.batch)
    max_diff = float((sim_once.cpu() - sim_pair.cpu()).abs().max())
    if not torch.allclose(sim_once.cpu(), sim_pair.cpu(), rtol=1e-4, atol=1e-5):
        raise SystemExit(f"similarity matrices differ: max |diff| = {max_diff:.3g}")

    print(
        f"eval {m} texts x {n} videos, head {args.head} (dim {args.dim}, grid {args.grid}, "
        f"frames {args.frames}, depth {args.depth}), batch {args.batch}, device {args.device}, "
        f"{args.threads} thread(s); max |sim diff| = {max_diff:.2e}\n"
    )
    print("| protocol | head runs (video batches) | seconds | vs embed-once |")
    print("| --- | --- | --- | --- |")
    print(f"| embed once (ours) | {runs_once} | {t_once:.3f} | 1.00x |")
    print(f"| per-pair recompute (upstream) | {runs_pair} | {t_pair:.3f} | {t_pair / t_once:.2f}x slower |")
    expected = math.ceil(m / args.batch)
    print(f"\nexpected ratio ~ ceil(texts / batch) = {expected} (head cost dominates)")


if __name__ == "__main__":
    main()
