"""search/text_encoder.py and search/clip_tokenizer.py: the exported CLIP text tower queries run, and
the query path's imports.

The reference for the tower is open_clip's own `encode_text` and for the ids open_clip's own
tokenizer (`open_clip.tokenize`); the module's output must equal them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from search_helpers import CAPTIONS, RANDOM_INIT_CLIP, unit_text_embeddings

from muse_pipeline.encoders.clip import UnsupportedModelError, register_tiny_config
from muse_pipeline.search.clip_tokenizer import ClipTokenizer
from muse_pipeline.search.query import Searcher
from muse_pipeline.search.text_encoder import (
    TEXT_ENCODER_DIR,
    TextEncoder,
    TextEncoderError,
    ensure_text_encoder,
    export_text_encoder,
    find_text_encoder,
)

TEXTS = [
    "a red circle moves left",
    "",
    "Two people talk in a kitchen &amp; a dog sleeps; Ünïcödé, 123 numbers!",
    "a very long caption that goes on " * 20,  # > 77 tokens: truncated, <eot> kept last
]
# Modules a query must not import (issue 16 item 6): heavy, and never needed by an exact search.
NOT_ON_THE_QUERY_PATH = ("open_clip", "torchvision", "faiss", "dask", "zarr", "matplotlib", "fastapi",
                         "uvicorn", "numba", "av", "muse_pipeline.models", "muse_pipeline.cache")


def perturbed_tiny(quick_gelu: bool, seed: int) -> torch.nn.Module:
    """The tiny open_clip CLIP with every parameter moved off its init (layer norms included), eval."""
    register_tiny_config()
    torch.manual_seed(seed)
    model = open_clip.create_model("muse-tiny", force_quick_gelu=quick_gelu).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quickgelu"])
def test_export_equals_open_clip_encode_text(tmp_path: Path, quick_gelu: bool) -> None:
    model = perturbed_tiny(quick_gelu, seed=3)
    folder = export_text_encoder(model, tmp_path / "te", model_name="muse-tiny", weights_id="w-test")
    config = json.loads((folder / "config.json").read_text())
    assert config["activation"] == ("quick_gelu" if quick_gelu else "gelu")
    assert (config["width"], config["heads"], config["layers"], config["context_length"], config["vocab_size"],
            config["embed_dim"]) == (64, 2, 2, 77, 49408, 64)
    assert (config["model_name"], config["weights_id"]) == ("muse-tiny", "w-test")
    assert sorted(os.listdir(folder)) == ["config.json", "weights.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind

    encoder = TextEncoder.load(folder)
    ids77 = open_clip.tokenize(TEXTS)  # open_clip's ids at its context length (77)
    with torch.inference_mode():
        want = model.encode_text(ids77).float()
    got = encoder.encode_texts(ids77.numpy())
    assert got.dtype == torch.float32 and got.shape == (len(TEXTS), 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Short rows (the index's words): only W positions run; equal to encode_text of the zero-padded ids.
    ids16 = open_clip.tokenize(TEXTS, context_length=16)
    padded = torch.nn.functional.pad(ids16, (0, 77 - 16))
    with torch.inference_mode():
        want16 = model.encode_text(padded).float()
    torch.testing.assert_close(encoder.encode_texts(ids16.numpy()), want16, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want16[3], want[3], atol=1e-3)  # truncation at 16 changed the long text


@pytest.mark.parametrize("words", [3, 16, 77])
def test_tokenizer_ids_equal_open_clip(words: int) -> None:
    got = ClipTokenizer().tokenize(TEXTS, words)
    want = open_clip.tokenize(TEXTS, context_length=words).numpy()
    assert got.dtype == np.int32 and got.shape == (len(TEXTS), words)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="max_words"):
        ClipTokenizer().tokenize(["a"], 78)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})


def test_tokenizer_and_tower_load_without_the_open_clip_package(tmp_path: Path) -> None:
    folder = export_text_encoder(perturbed_tiny(False, seed=4), tmp_path / "te", model_name="muse-tiny",
                                 weights_id="w")
    want = open_clip.tokenize(TEXTS[:1], context_length=16).numpy()
    code = f"""
import sys
from muse_pipeline.search.text_encoder import TextEncoder
enc = TextEncoder.load({str(folder)!r})
ids = enc.tokenize({TEXTS[:1]!r}, 16)
print(ids.tolist(), tuple(enc.encode_texts(ids).shape))
print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'open_clip', 'torchvision'}}))
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{want.tolist()} (1, 64)" and lines[1] == "[]"


def test_damaged_or_foreign_exports_are_user_errors(tmp_path: Path) -> None:
    folder = export_text_encoder(perturbed_tiny(False, seed=5), tmp_path / "te", model_name="muse-tiny",
                                 weights_id="w")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "layers": 3}))
    with pytest.raises(TextEncoderError, match="do not match its config.json.*rebuild the index"):
        TextEncoder.load(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TextEncoderError, match="cannot read"):
        TextEncoder.load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(TextEncoderError, match="not an exported text tower"):
        TextEncoder.load(folder)


def test_unsupported_towers_are_refused(tmp_path: Path) -> None:
    from open_clip.transformer import LayerScale

    model = perturbed_tiny(False, seed=6)
    model.transformer.resblocks[1].ls_1 = LayerScale(64)
    with pytest.raises(UnsupportedModelError, match="layer scale"):
        export_text_encoder(model, tmp_path / "te", model_name="muse-tiny", weights_id="w")
    model = perturbed_tiny(False, seed=6)
    model.attn_mask = None
    with pytest.raises(UnsupportedModelError, match="not causal"):
        export_text_encoder(model, tmp_path / "te", model_name="muse-tiny", weights_id="w")
    assert not (tmp_path / "te").exists()


def test_index_build_exports_and_queries_use_it(caption_index, tiny_clip) -> None:
    """`muse index` writes the export; a query reads it; without it (an older index) the open_clip path
    gives the same hits."""
    out, _ = caption_index
    assert find_text_encoder(out, RANDOM_INIT_CLIP) == out / TEXT_ENCODER_DIR
    searcher = Searcher(out)
    assert searcher.encoder.source == "export"
    np.testing.assert_allclose(searcher.encoder.encode(CAPTIONS), unit_text_embeddings(tiny_clip, CAPTIONS),
                               rtol=1e-5, atol=1e-6)
    hits = searcher.search(CAPTIONS, top_k=3)
    assert [h[0]["id"] for h in hits] == [f"clip{k}" for k in range(len(CAPTIONS))]
    shutil.rmtree(out / TEXT_ENCODER_DIR)
    legacy = Searcher(out)
    assert legacy.encoder.source == "open_clip"
    for a, b in zip(hits, legacy.search(CAPTIONS, top_k=3), strict=True):
        assert [h["id"] for h in a] == [h["id"] for h in b]
        assert [h["score"] for h in a] == pytest.approx([h["score"] for h in b], abs=1e-5)


def test_an_export_of_another_clip_is_not_used(caption_index) -> None:
    out, _ = caption_index
    gen = out / (out / "CURRENT").read_text().strip()
    meta = json.loads((gen / "index.json").read_text())
    meta["clip"] = {**meta["clip"], "weights_id": "another"}
    assert find_text_encoder(out, meta["clip"]) is None
    # A generation folder inside an index root finds the root's export.
    assert find_text_encoder(gen, RANDOM_INIT_CLIP) == out / TEXT_ENCODER_DIR


def test_export_is_written_once_per_index_root(caption_index) -> None:
    """ensure_text_encoder keeps a matching export untouched and replaces one of another CLIP."""
    out, _ = caption_index
    weights = out / TEXT_ENCODER_DIR / "weights.safetensors"
    inode = weights.stat().st_ino
    assert ensure_text_encoder(out, RANDOM_INIT_CLIP) == out / TEXT_ENCODER_DIR
    assert weights.stat().st_ino == inode  # not rewritten
    config_path = out / TEXT_ENCODER_DIR / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "weights_id": "another"}))
    ensure_text_encoder(out, RANDOM_INIT_CLIP)
    assert json.loads(config_path.read_text())["weights_id"] == "random-init"
    assert weights.stat().st_ino != inode


def imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from `python -X importtime` output ("import time: self | cumulative | name")."""
    return {m.group(1).strip() for m in re.finditer(r"^import time:\s*\d+\s*\|\s*\d+\s*\|\s*(.+)$",
                                                    importtime_stderr, re.MULTILINE)}


def forbidden(modules: set[str], allowed: tuple[str, ...] = ()) -> list[str]:
    """The modules of NOT_ON_THE_QUERY_PATH (but `allowed`) and their submodules among `modules`."""
    names = [f for f in NOT_ON_THE_QUERY_PATH if f not in allowed]
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in names))


def test_query_cli_imports_no_heavy_module(caption_index) -> None:
    out, _ = caption_index
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "muse_pipeline.cli.main", "search", CAPTIONS[2],
         "--index", str(out), "--json", "-k", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    hits = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [h["rank"] for h in hits] == [1, 2] and hits[0]["id"] == "clip2"
    modules = imported_modules(proc.stderr)
    assert "torch" in modules and "muse_pipeline.search.text_encoder" in modules  # the parse sees imports
    assert forbidden(modules) == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_query_server_answers_from_the_first_connection(caption_index, tmp_path: Path) -> None:
    """`muse serve` binds before loading: a client that connects as soon as the port accepts (usually
    while the text tower still loads: connections wait in the backlog) gets its answer once the server
    is up; the server imports no open_clip."""
    out, _ = caption_index
    port = free_port()
    log = tmp_path / "importtime.txt"  # a file, not a pipe: importtime output would fill a pipe and block
    with open(log, "w") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "muse_pipeline.cli.main", "serve", "--index", str(out),
             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the server never bound its port"
                time.sleep(0.02)
        url = f"http://127.0.0.1:{port}/search?q={CAPTIONS[4].replace(' ', '+')}&k=1"
        with urllib.request.urlopen(url, timeout=120) as response:
            body = json.loads(response.read())
        assert body["hits"][0]["id"] == "clip4"
    finally:
        server.terminate()
        server.wait(timeout=60)
    modules = imported_modules(log.read_text())
    assert "uvicorn" in modules and forbidden(modules, allowed=("fastapi", "uvicorn")) == []
