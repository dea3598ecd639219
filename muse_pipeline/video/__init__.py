"""Video decoding at the CLIP4Clip 1-fps protocol and CLIP preprocessing (spec section 1)."""

from muse_pipeline.video.decode import BACKENDS, DecodedClip, DecodeError, decode_clip, decode_clip_report  # noqa: F401
from muse_pipeline.video.sampling import clip_sample_times, displayed_frames, sample_times, subsample  # noqa: F401
from muse_pipeline.video.transforms import preprocess_frames  # noqa: F401
