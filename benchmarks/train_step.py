"""Training step time: from the cache (CLIP tokens precomputed) vs end to end (CLIP in the loop).

Same batch, same head, same optimizer settings; random-init weights (no download). Prints a markdown
table with the end-to-end / cache ratio measured in this run.

    .venv/bin/python benchmarks/train_step.py --model muse-tiny --head muse --batch 8 --frames 4
    .venv/bin/python benchmarks/train_step.py --model ViT-B-32 --head meanP --batch 8 --frames 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _step_fn(pair, optimizer, batch, logit_scale):
    from muse_pipeline.models.loss import contrastive_loss

    def step() -> float:
        text, video = pair(batch)
        loss = contrastive_loss(text.float(), video.float(), logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        return float(loss.detach())

    return step


def _time(step, warmup: int, repeats: int, device: torch.device) -> tuple[float, float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (statistics.stdev(times) if len(times) > 1 else 0.0)


def _optimizer(module, lr_mult):
    from muse_pipeline.models.params import param_groups

    groups = param_groups(module, 1e-4, 0.2, lr_mult=lr_mult)
    for g in groups:
        g.pop("param_names", None)
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.98), eps=1e-6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="muse-tiny")
    ap.add_argument("--head", default="muse")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--words", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from muse_pipeline.encoders.clip import ClipEncoder
    from muse_pipeline.models.retrieval import LOGIT_SCALE_SCRATCH, ModelConfig, RetrievalModel
    from muse_pipeline.training.modules import CachePairModel, EndToEndPairModel

    enc = ClipEncoder(args.model, device=str(device))
    b, t, s = args.batch, args.frames, enc.image_size
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(b, t, 3, s, s, generator=g).to(device)
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    mask[1::2, t // 2 :] = False  # half of the videos are short: the padding path runs too
    ids = torch.from_numpy(enc.tokenize([f"a clip number {i} of a moving shape" for i in range(b)], args.words))
    ids = ids.long().to(device)
    with torch.no_grad():
        real = enc.frame_tokens(pixels[mask])
        tokens = real.new_zeros((b, t, *real.shape[1:]))
        tokens[mask] = real
        tokens = tokens.half()  # what the cache stores
        text_emb = enc.text_features(ids).half()

    mcfg = ModelConfig(head=args.head, dim=enc.dim, grid=enc.grid, max_frames=t, logit_scale_init=LOGIT_SCALE_SCRATCH)
    rows = []
    torch.manual_seed(0)
    cache_pair = CachePairModel(RetrievalModel(mcfg)).to(device)
    cache_opt = _optimizer(cache_pair, {"model.head.": 10.0, "model.text_adapter.": 10.0})
    cache_step = _step_fn(cache_pair, cache_opt, {"tokens": tokens, "mask": mask, "text_emb": text_emb},
                          cache_pair.model.logit_scale)
    rows.append(("from cache", *_time(cache_step, args.warmup, args.repeats, device)))

    torch.manual_seed(0)
    e2e_pair = EndToEndPairModel(enc, RetrievalModel(mcfg)).to(device)
    enc.model.logit_scale.requires_grad_(False)
    e2e_opt = _optimizer(e2e_pair, {"model.head.": 10.0, "model.text_adapter.": 10.0, "clip.": 1e-3})
    e2e_step = _step_fn(e2e_pair, e2e_opt, {"pixels": pixels, "mask": mask, "text_ids": ids}, e2e_pair.model.logit_scale)
    rows.append(("end to end (CLIP in the loop)", *_time(e2e_step, args.warmup, args.repeats, device)))

    base = rows[0][1]
    print(f"training step, {args.model} (random init), head {args.head}, batch {b}, {t} frames, "
          f"device {device}, threads {torch.get_num_threads()}, median of {args.repeats}")
    print()
    print("| mode | step time (s) | stdev (s) | ratio vs cache |")
    print("| --- | ---: | ---: | ---: |")
    for name, med, sd in rows:
        print(f"| {name} | {med:.4f} | {sd:.4f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
