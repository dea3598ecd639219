"""MUSE models: selective scan, BiMamba / ResMamba, pyramid, sequence packing, heads, retrieval model, loss."""

from muse_pipeline.models.bimamba import BiMamba
from muse_pipeline.models.conv import causal_conv1d
from muse_pipeline.models.heads import HEADS, build_head
from muse_pipeline.models.loss import contrastive_loss
from muse_pipeline.models.params import DEFAULT_LR_MULT, param_groups
from muse_pipeline.models.pyramid import MultiScalePyramid
from muse_pipeline.models.resmamba import ResMamba
from muse_pipeline.models.retrieval import ModelConfig, RetrievalModel
from muse_pipeline.models.scan import selective_scan
from muse_pipeline.models.scan_ref import selective_scan_ref
from muse_pipeline.models.sequence import pack_sequence

__all__ = [
    "DEFAULT_LR_MULT",
    "HEADS",
    "BiMamba",
    "ModelConfig",
    "MultiScalePyramid",
    "ResMamba",
    "RetrievalModel",
    "build_head",
    "causal_conv1d",
    "contrastive_loss",
    "pack_sequence",
    "param_groups",
    "selective_scan",
    "selective_scan_ref",
]
