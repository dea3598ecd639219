"""muse-pipeline: MUSE text-video retrieval as a staged pipeline (extract -> train -> evaluate/search)."""

__version__ = "0.1.0"
