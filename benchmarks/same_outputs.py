"""Same outputs before and after a refactor: store arrays, runs (config.json, weights), evaluations.

Run it at two commits into two folders and compare the JSON it prints (`--compare A.json B.json`):

    .venv/bin/python benchmarks/same_outputs.py /tmp/before > before.json   # at the old commit
    .venv/bin/python benchmarks/same_outputs.py /tmp/after > after.json     # at the new commit
    .venv/bin/python benchmarks/same_outputs.py --compare before.json after.json

It writes a tiny store (folder dataset with clip windows, random tokens), trains from it (muse head;
meanP selection + refit; --init-head), trains one end-to-end run on a generated synthetic dataset,
evaluates the runs and lists --print-param-groups rows. Hashes are of array and tensor bytes (not of
files, whose headers may order keys differently); paths and the RAM-dependent cache_memory reason are
masked. Store arrays added by a change (e.g. videos/start, videos/end) are listed, not compared.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

TIME_KEYS = ("seconds", "time", "elapsed", "wall_s", "samples_per_s", "step_s")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _store_arrays(path: Path, out: Path) -> dict[str, str]:
    import zarr

    root = zarr.open_group(str(path), mode="r")
    hashes = {}
    for group in ("videos", "texts"):
        for name, arr in root[group].arrays():
            values = arr[:]
            if values.dtype.kind in "OTU":  # strings: the output folder masked (paths hold it)
                data = "\x00".join(str(v).replace(str(out), "<OUT>") for v in values.tolist()).encode()
            else:
                data = values.tobytes()
            hashes[f"{group}/{name}"] = _sha(data)
    hashes["attrs"] = _sha(json.dumps(dict(root.attrs), sort_keys=True).encode())
    return hashes


def _weights(run: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(run.glob("*.safetensors")):
        tensors = load_file(file)
        out[file.name] = _sha(b"".join(k.encode() + tensors[k].numpy().tobytes() for k in sorted(tensors)))
    return out


def _masked(obj, out: Path):
    text = json.dumps(obj, sort_keys=True, default=str).replace(str(out.resolve()), "<OUT>").replace(str(out), "<OUT>")
    value = json.loads(text)
    reason = ((value.get("runtime") or {}).get("cache_memory") or {}) if isinstance(value, dict) else {}
    if "reason" in reason:
        reason["reason"] = "<RAM-dependent>"
    return value


def _strip_times(obj):
    if isinstance(obj, dict):
        return {k: _strip_times(v) for k, v in obj.items() if k not in TIME_KEYS}
    return obj


def collect(out: Path) -> dict:
    from muse_pipeline.cache.store import FeatureCache
    from muse_pipeline.data import load_dataset
    from muse_pipeline.data.synthetic import generate_synthetic
    from muse_pipeline.stages.evaluate import evaluate_run
    from muse_pipeline.stages.train import param_group_rows, run_train

    shutil.rmtree(out, ignore_errors=True)
    data = out / "data"
    data.mkdir(parents=True)
    for i in range(12):
        (data / f"v{i:02d}.mp4").write_bytes(b"\0")
    rows = ["video,caption,split,start,end"]
    for i in range(12):
        split = "train" if i < 8 else "val" if i < 10 else "test"
        window = ("1.5", "4") if i % 3 == 0 else ("", "")
        rows += [f"v{i:02d}.mp4,caption {i} a,{split},{window[0]},{window[1]}",
                 f"v{i:02d}.mp4,caption {i} b,{split},{window[0]},{window[1]}"]
    (data / "captions.csv").write_text("\n".join(rows) + "\n")
    index = load_dataset("folder", data)
    fp = {"dataset": "folder", "model": "muse-tiny", "weights": "random-init", "frames": 3, "words": 8,
          "num_tokens": 5, "dim": 8}
    cache_path = out / "c.zarr"
    cache = FeatureCache.create(cache_path, index, frames=3, num_tokens=5, dim=8, words=8, fingerprint=fp,
                                videos_per_shard=4, text_tokens=np.ones((len(index.captions), 8), np.int32))
    rng = np.random.default_rng(0)
    for k in range(cache.n_shards):
        lo, hi = cache.shard_range(k)
        tokens = np.zeros((hi - lo, 3, 5, 8), np.float16)
        mask = np.zeros((hi - lo, 3), np.uint8)
        for r in range(hi - lo):
            n = 1 + (lo + r) % 3
            tokens[r, :n] = rng.standard_normal((n, 5, 8))
            mask[r, :n] = 1
        cache.write_shard_videos(lo, tokens, mask, np.ones(hi - lo, np.uint8))
    cache.write_texts(0, embeddings=rng.standard_normal((len(index.captions), 8)).astype(np.float16))
    cache.add_failures([{"id": "v99", "reason": "example"}])
    result: dict = {"store": _store_arrays(cache_path, out), "runs": {}, "evals": {}}

    runs = out / "runs"
    common = dict(runs_dir=runs, batch_size=4, num_workers=0, quiet=True)
    made = {
        "muse": run_train(from_cache=cache_path, name="muse", head="muse", epochs=2, **common),
        "refit": run_train(from_cache=cache_path, name="sel", head="meanP", epochs=2, refit=True, **common),
    }
    made["init"] = run_train(from_cache=cache_path, name="init", head="meanP", init_head=runs / "sel", epochs=1,
                             **common)
    syn = generate_synthetic(out / "syn", n_videos=8, seed=0)
    made["e2e"] = run_train(end_to_end=True, dataset="synthetic", data_root=syn, model="muse-tiny", head="meanP",
                            name="e2e", epochs=1, frames=2, clip_lr=1e-3, **common)
    for name, run in made.items():
        config = _masked(json.loads((run / "config.json").read_text()), out)
        if name == "e2e":  # the generated synthetic files' checksum varies from one generation to the next
            config.get("fingerprint", {}).pop("annotation_checksum", None)
        result["runs"][name] = {"config": config, "weights": _weights(run)}
        result["evals"][name] = _strip_times(_masked(evaluate_run(run, split="test"), out))
    result["param_rows"] = {
        "new": param_group_rows(from_cache=cache_path, head="muse", batch_size=4),
        "resume": param_group_rows(resume=runs / "muse"),
        "e2e": param_group_rows(resume=runs / "e2e"),
    }
    return json.loads(json.dumps(result, default=str))


def compare(before: dict, after: dict) -> int:
    differ = 0

    def walk(a, b, where):
        nonlocal differ
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if key not in a:
                    if where != "store":
                        differ += 1
                    print(f"new after{' (a store array: not compared)' if where == 'store' else ''}: {where}.{key}")
                elif key not in b:
                    differ += 1
                    print(f"missing after: {where}.{key}")
                else:
                    walk(a[key], b[key], f"{where}.{key}" if where else key)
        elif a != b:
            differ += 1
            print(f"differs: {where}")

    walk(before, after, "")
    print("same outputs" if not differ else f"{differ} difference(s)")
    return 1 if differ else 0


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        sys.exit(compare(json.loads(Path(sys.argv[2]).read_text()), json.loads(Path(sys.argv[3]).read_text())))
    print(json.dumps(collect(Path(sys.argv[1])), sort_keys=True))
