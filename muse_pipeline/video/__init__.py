"""Video decoding at the CLIP4Clip 1-fps protocol and CLIP preprocessing (spec section 1)."""

from muse_pipeline.video.decode import BACKENDS, DecodeError, decode_clip  # noqa: F401
from muse_pipeline.video.sampling import clip_frame_indices, frame_indices, sample_times, subsample  # noqa: F401
from muse_pipeline.video.transforms import preprocess_frames  # noqa: F401
