"""A 2-process CPU DDP run (gloo, spawned here) equals one process with the same global batch:
same global loss at every step and the same updated weights."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from muse_pipeline.training.config import TrainConfig
from muse_pipeline.training.distributed import setup, teardown
from muse_pipeline.training.loop import Trainer, seed_everything
from muse_pipeline.training.modules import CachePairModel


class Tiny(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.head = nn.Linear(dim, dim)
        self.text_adapter = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_videos(self, tokens, mask):
        m = mask.float()[..., None]
        return F.normalize(self.head((tokens[:, :, 0].float() * m).sum(1) / m.sum(1)), dim=-1)

    def embed_texts(self, e):
        return F.normalize(e + self.text_adapter(e), dim=-1)


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n: int = 40, d: int = 8) -> None:
        g = torch.Generator().manual_seed(1)
        self.tokens = torch.randn(n, 2, 2, d, generator=g)
        self.mask = torch.ones(n, 2, dtype=torch.bool)
        self.text = self.tokens[:, :, 0].mean(1) + 0.3 * torch.randn(n, d, generator=g)

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, positions):
        idx = torch.as_tensor(np.asarray(positions))
        return {"tokens": self.tokens[idx], "mask": self.mask[idx], "text_emb": self.text[idx]}


CFG = dict(epochs=2, batch_size=8, lr=1e-2, num_workers=0, log_every=1, frames=2, words=8)


def _train(run_dir: Path) -> dict[str, torch.Tensor]:
    ctx = setup("cpu")
    seed_everything(0)
    pair = CachePairModel(Tiny())
    trainer = Trainer(pair, Pairs(), TrainConfig(**CFG), ctx, run_dir, lambda p: None, quiet=True)
    trainer.fit()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _worker(rank: int, world: int, port: int, run_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        weights = _train(Path(run_dir))
        torch.save(weights, Path(run_dir) / f"weights-rank{rank}.pt")
    finally:
        teardown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "step"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_two_process_ddp_equals_single_process(tmp_path):
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    single_dir.mkdir()
    ddp_dir.mkdir()
    for k in ("RANK", "WORLD_SIZE"):
        assert k not in os.environ
    want = _train(single_dir)
    mp.spawn(_worker, args=(2, _free_port(), str(ddp_dir)), nprocs=2, join=True)

    single_losses, ddp_losses = _losses(single_dir), _losses(ddp_dir)
    assert len(ddp_losses) == len(single_losses) == 2 * (40 // 8)
    np.testing.assert_allclose(ddp_losses, single_losses, rtol=1e-5, atol=1e-6)
    assert single_losses[-1] < single_losses[0]
    w0 = torch.load(ddp_dir / "weights-rank0.pt")
    w1 = torch.load(ddp_dir / "weights-rank1.pt")
    for k, v in want.items():
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0)  # DDP keeps ranks in lockstep
        torch.testing.assert_close(w0[k], v, rtol=1e-4, atol=1e-5)
    # training moved the weights well beyond that tolerance
    seed_everything(0)
    assert (want["head.weight"] - Tiny().head.weight).abs().max() > 1e-2
