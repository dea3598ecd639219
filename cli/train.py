"""`muse train`: train a similarity head from the cache, or end to end with CLIP in the loop."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import typer

from muse_pipeline.cli.common import fail, setup_logging


def train_cmd(
    from_cache: Path = typer.Option(None, help="Train from this feature cache (CLIP is not loaded).", show_default="none: give it or --end-to-end"),
    end_to_end: bool = typer.Option(False, "--end-to-end", help="Decode frames and fine-tune CLIP in the loop (lr 1e-7).", show_default="off"),
    dataset: str = typer.Option(None, help="End to end: msrvtt | didemo | activitynet | folder | synthetic.", show_default="none"),
    data_root: Path = typer.Option(None, help="End to end: annotation files and videos of the dataset.", show_default="none"),
    model: str = typer.Option("ViT-B-32", help="End to end: open_clip model name (muse-tiny for tests)."),
    pretrained: str = typer.Option(None, help="End to end: open_clip tag or weights file.", show_default="random init"),
    decoder: str = typer.Option("pyav", help="End to end: pyav | decord."),
    head: str = typer.Option(None, help="Similarity head: muse | meanP | seqTransf | muse-transformer.", show_default="muse"),
    name: str = typer.Option(None, help="Run name: <runs-dir>/<name>/.", show_default="<dataset>-<head>, numbered if taken"),
    runs_dir: Path = typer.Option(Path("runs"), help="Parent folder of run directories."),
    resume: Path = typer.Option(None, help="Continue this run directory exactly where it stopped.", show_default="none: a new run"),
    init_head: Path = typer.Option(None, help="End to end: start the head from this cache-trained run (best weights).", show_default="none"),
    epochs: int = typer.Option(None, help="Epochs (count).", show_default="dataset preset"),
    batch_size: int = typer.Option(None, help="GLOBAL batch size over all GPUs (videos).", show_default="dataset preset, 128"),
    lr: float = typer.Option(None, help="Base learning rate (the muse head and text adapter get 10x).", show_default="1e-4"),
    head_lr_mult: float = typer.Option(None, help="Learning-rate multiplier of the head and text adapter.", show_default="10"),
    clip_lr: float = typer.Option(None, help="CLIP's learning rate: the towers end to end, and logit_scale always.", show_default="1e-7"),
    weight_decay: float = typer.Option(None, help="AdamW weight decay (none on biases, norms, A_log, D, logit_scale).", show_default="0.2"),
    warmup_fraction: float = typer.Option(None, help="Linear warmup as a fraction of all steps.", show_default="0.1"),
    grad_clip: float = typer.Option(None, help="Gradient-norm clip (0 disables).", show_default="1.0"),
    seed: int = typer.Option(None, help="Random seed.", show_default="42"),
    val_fraction: float = typer.Option(None, help="Fraction of train videos held out for validation when there is no val split.", show_default="dataset preset"),
    frames: int = typer.Option(None, help="End to end: max frames per video (from cache: must match the cache).", show_default="dataset preset"),
    words: int = typer.Option(None, help="End to end: max words per caption (tokens).", show_default="dataset preset"),
    no_text_adapter: bool = typer.Option(False, "--no-text-adapter", help="Train without the residual text adapter.", show_default="off"),
    no_amp: bool = typer.Option(False, "--no-amp", help="Disable bf16 autocast on CUDA.", show_default="off"),
    workers: int = typer.Option(None, help="DataLoader worker processes (count).", show_default="2"),
    log_every: int = typer.Option(None, help="Steps between step records in metrics.jsonl.", show_default="10"),
    device: str = typer.Option(None, help="cpu | cuda.", show_default="cuda when available"),
    gpus: int = typer.Option(None, help="Train on N GPUs with DDP: relaunches itself through torchrun.", show_default="1"),
    cache_memory: str = typer.Option("auto", help="From cache: keep training tokens in ram (pinned) | device "
                                     "(GPU) | off (read the cache each batch) | auto (by size and free memory)."),
    require_kernels: bool = typer.Option(False, "--require-kernels", help="Fail unless the fused CUDA scan/conv "
                                         "kernels (the `cuda` extra) run, instead of warning.", show_default="off"),
    nccl_timeout: float = typer.Option(None, help="Seconds a DDP collective may wait, covering rank 0's "
                                       "validation and saving.", show_default="7200 s"),
    refit: bool = typer.Option(
        False, "--refit",
        help="After selecting the epoch on validation, train again on ALL training videos (no held-out slice) "
             "for that many epochs, in runs/<name>-refit (needs a validation set).", show_default="off",
    ),
    print_param_groups: bool = typer.Option(
        False, "--print-param-groups",
        help="List every trainable parameter with its group, learning rate and weight decay, then exit.",
        show_default="off",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar.", show_default="off"),
) -> None:
    """Train a MUSE (or baseline) head; writes runs/<name>/ with best/last weights and metrics.jsonl.

    Multi-GPU by hand: `python -m torch.distributed.run --standalone --nproc_per_node N $(which muse) train ...`.
    Ctrl-C saves a resumable state; `--resume runs/<name>` continues exactly.
    """
    from muse_pipeline.training.distributed import CHILD_ENV, launched_by_torchrun, relaunch, strip_gpus_flag

    if gpus is not None and gpus > 1 and not launched_by_torchrun() and not os.environ.get(CHILD_ENV):
        raise typer.Exit(relaunch(gpus, strip_gpus_flag(sys.argv)))

    from muse_pipeline.stages.train import ConfigMismatch, run_train
    from muse_pipeline.training.data import CacheError
    from muse_pipeline.training.loop import NonFiniteLossError

    setup_logging(quiet)
    overrides = dict(
        epochs=epochs, batch_size=batch_size, lr=lr, head_lr_mult=head_lr_mult, clip_lr=clip_lr,
        weight_decay=weight_decay, warmup_fraction=warmup_fraction, grad_clip=grad_clip, seed=seed,
        val_fraction=val_fraction, frames=frames, words=words, num_workers=workers, log_every=log_every,
        text_adapter=False if no_text_adapter else None, amp=False if no_amp else None,
    )
    if print_param_groups:
        from muse_pipeline.stages.train import param_group_rows

        rows = param_group_rows(
            from_cache=from_cache, end_to_end=end_to_end, dataset=dataset, data_root=data_root, model=model,
            pretrained=pretrained, decoder=decoder, head=head, resume=resume, device=device or "cpu",
            quiet=True, **{k: v for k, v in overrides.items() if v is not None},
        )
        typer.echo(format_param_rows(rows))
        return
    try:
        run_dir = run_train(
            from_cache=from_cache, end_to_end=end_to_end, dataset=dataset, data_root=data_root, model=model,
            pretrained=pretrained, decoder=decoder, head=head, name=name, runs_dir=runs_dir, resume=resume,
            init_head=init_head, device=device, quiet=quiet, cache_memory=cache_memory,
            require_kernels=require_kernels, nccl_timeout=nccl_timeout, refit=refit, **overrides,
        )
    except KeyboardInterrupt:
        fail("interrupted: a resumable state was saved; continue with `muse train --resume RUN_DIR`.", code=130)
    except (CacheError, ConfigMismatch, NonFiniteLossError, FileExistsError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    if not quiet:
        typer.echo(f"run written to {run_dir}")


def format_param_rows(rows: list[dict]) -> str:
    """A plain table: name, shape, group, lr, weight decay (one line per parameter), then a summary."""
    header = ("name", "shape", "group", "lr", "weight_decay")
    cells = [(r["name"], "x".join(map(str, r["shape"])) or "scalar", r["group"], f"{r['lr']:.3g}",
              f"{r['weight_decay']:g}") for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = lambda c: "  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip()  # noqa: E731
    groups: dict[str, list[int]] = {}
    for r in rows:
        groups.setdefault(f"{r['group']} (lr {r['lr']:.3g}, wd {r['weight_decay']:g})", []).append(
            math.prod(r["shape"]))
    summary = [f"{g}: {len(n)} tensors, {sum(n):,} values" for g, n in groups.items()]
    return "\n".join([line(header), *map(line, cells), "", *summary])
