"""Dataset loaders (registry `DATASETS`): msrvtt, didemo, activitynet, folder, synthetic."""

# The loader modules are imported for their side effect: each registers itself in DATASETS.
from muse_pipeline.data import activitynet, didemo, folder, msrvtt, synthetic  # noqa: F401
from muse_pipeline.data.base import (  # noqa: F401
    DATASETS,
    SPLITS,
    AnnotationError,
    CaptionItem,
    DatasetIndex,
    VideoItem,
    load_dataset,
)
from muse_pipeline.data.synthetic import generate_synthetic  # noqa: F401
