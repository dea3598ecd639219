"""TrainRequest: everything one training call asks for, as one frozen value.

`run_train(**kwargs)` (stages/train.py) keeps its keyword interface and builds a TrainRequest with
`TrainRequest.from_kwargs`: the named fields below, every other keyword a TrainConfig field collected in
`train_overrides` (None = the preset's value). `needs_val`, `protocol` and `describe_only` are set by
the stage itself (refit, --print-param-groups), not by run_train's callers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TrainRequest:
    """One run: its data source (cache, or end to end from a dataset), head, where it goes, how it runs.

    from_cache / end_to_end+dataset+data_root+model+pretrained+decoder: the data source;
    resume: a run directory to continue; init_head: a run whose best weights start a new one;
    model_overrides: ModelConfig fields; train_overrides: TrainConfig fields;
    cache_memory (auto | ram | device | off), require_kernels, nccl_timeout: how it runs;
    needs_val: refuse a run without validation set (refit's selection run);
    protocol: the refit record for config.json; describe_only: build, train nothing, return param rows.
    """

    from_cache: Path | str | None = None
    end_to_end: bool = False
    dataset: str | None = None
    data_root: Path | str | None = None
    model: str = "ViT-B-32"
    pretrained: str | None = None
    decoder: str = "pyav"
    head: str | None = None
    name: str | None = None
    runs_dir: Path | str = Path("runs")
    resume: Path | str | None = None
    init_head: Path | str | None = None
    device: str | None = None
    quiet: bool = False
    model_overrides: Mapping[str, Any] | None = None
    on_step_end: Callable[[Any], None] | None = None
    cache_memory: str = "auto"
    require_kernels: bool = False
    nccl_timeout: float | None = None
    train_overrides: Mapping[str, Any] = field(default_factory=dict)
    needs_val: bool = False
    protocol: Mapping[str, Any] | None = None
    describe_only: bool = False

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> TrainRequest:
        """run_train's keywords -> a request; keywords that are not fields go to `train_overrides`."""
        names = {f.name for f in fields(cls)} - {"train_overrides"}
        return cls(**{k: v for k, v in kwargs.items() if k in names},
                   train_overrides={k: v for k, v in kwargs.items() if k not in names})

    def replace(self, **changes: Any) -> TrainRequest:
        return replace(self, **changes)
