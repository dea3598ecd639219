"""CLIP's BPE tokenizer for queries, without importing the open_clip package.

`import open_clip` runs the package's __init__, which imports its model zoo and torchvision: over a
second before the first query. The tokenizer itself is one self-contained module of open_clip
(`open_clip/tokenizer.py`: gzip, ftfy, regex, numpy, torch; no relative imports), so it is loaded
here by its file path (found with `importlib.util.find_spec("open_clip")`, which reads no package
code). Where open_clip is already imported, its own `open_clip.tokenizer` module is used instead.

`ClipTokenizer.tokenize(texts, words)` returns exactly `ClipEncoder.tokenize`'s ids: int32 [M, W],
`<sot>` + bpe[:W-2] + `<eot>`, zero padded (tests/test_search_text_encoder.py compares them).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from muse_pipeline.errors import InputError

# The name the file-loaded module is registered under in sys.modules (loaded once per process).
STANDALONE_MODULE = "muse_pipeline.search._open_clip_tokenizer_file"


def tokenizer_module() -> ModuleType:
    """open_clip's tokenizer module: the imported one if open_clip is loaded, else loaded by file path."""
    for name in ("open_clip.tokenizer", STANDALONE_MODULE):
        if name in sys.modules:
            return sys.modules[name]
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(loc) / "tokenizer.py" for loc in locations if (Path(loc) / "tokenizer.py").is_file()), None)
    if path is None:  # an open_clip laid out differently: fall back to the package import
        import open_clip.tokenizer

        return open_clip.tokenizer
    file_spec = importlib.util.spec_from_file_location(STANDALONE_MODULE, path)
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[STANDALONE_MODULE] = module
    try:
        file_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[STANDALONE_MODULE]
        raise
    return module


class ClipTokenizer:
    """open_clip's `SimpleTokenizer` (the BPE of every standard CLIP) with `ClipEncoder.tokenize`'s framing.

    clean: the model's text cleaning (open_clip `tokenizer_kwargs["clean"]`, "lower" for all standard
    CLIP models); context_length: the text tower's positions (the most ids a row may hold).
    """

    def __init__(self, context_length: int = 77, clean: str = "lower") -> None:
        module = tokenizer_module()
        # The module builds a default tokenizer when it loads (open_clip's `_tokenizer`): reuse it.
        default = getattr(module, "_tokenizer", None)
        if clean == "lower" and default is not None:
            self.bpe = default
        else:
            self.bpe = module.SimpleTokenizer(clean=clean)
        self.context_length = int(context_length)
        self.sot_id = int(self.bpe.sot_token_id)
        self.eot_id = int(self.bpe.eot_token_id)
        self.vocab_size = int(self.bpe.vocab_size)

    def tokenize(self, texts: Sequence[str] | str, max_words: int) -> np.ndarray:
        """texts (M) -> int32 [M, W]: `<sot>` + bpe[:W-2] + `<eot>`, zero padded (W = max_words)."""
        return frame_ids(self.bpe.encode, texts, max_words, self.sot_id, self.eot_id, self.context_length)


def frame_ids(encode: Callable[[str], list[int]], texts: Sequence[str] | str, max_words: int, sot_id: int,
              eot_id: int, context_length: int) -> np.ndarray:
    """texts (M) -> int32 [M, W]: `<sot>` + encode(text)[:W-2] + `<eot>`, zero padded (W = max_words).

    The framing of every CLIP caption in this package (ClipEncoder.tokenize and queries): truncation
    keeps the first W-2 BPE ids and always ends with `<eot>` (argmax pooling finds it).
    """
    if isinstance(texts, str):
        texts = [texts]
    if not 3 <= max_words <= context_length:
        raise InputError(f"max_words (--words) must be in [3, {context_length}], got {max_words}")
    out = np.zeros((len(texts), max_words), dtype=np.int32)
    for row, text in enumerate(texts):
        ids = [sot_id, *encode(text)[: max_words - 2], eot_id]
        out[row, : len(ids)] = ids
    return out
