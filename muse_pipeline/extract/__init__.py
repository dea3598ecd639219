"""Feature extraction: decode videos, run CLIP, cache every frame's tokens in a sharded Zarr store.

The extract stage (`muse_pipeline.stages.extract`) wires these modules; each has one job:
- `config`: `ExtractConfig` and `ExtractSummary`, the defaults sized to the machine, the choice
  lists, and every check of what a user can get wrong (options, device, output disk);
- `windows`: auto windows (moments) of long folder files on one time grid per file;
- `rows`: a dataset's store rows (windows expanded) and their file facts (duration, size, mtime);
- `library`: a folder library that grows (new / changed / removed / unchanged files);
- `store_plan`: what a run does to its store (create, resume, update), planned read-only first,
  then applied under the lock (`open_store` creates or reopens it);
- `jobs`: `ShardJob` / `TextJob`, the plain data a worker gets, and their planning from a store;
- `grid`: a file's auto-window rows in a shard, each grid time decoded and encoded once;
- `encoders`: the per-process CLIP encoder cache;
- `decode_pool`: decode + preprocess of one video, in threads or a pool of processes;
- `staging`: a shard's staging folder (staged videos, in-flight record, crash counts), the ledger
  merge, retries of failed videos and the progress count;
- `worker`: the shard and text workers, the ownership check and the test-only hooks;
- `dask_runner`: runs the jobs on a dask LocalCluster or a remote scheduler.

One writer per store: the client holds `<store>.lock` (muse_pipeline.cache.lock) for the whole run;
a second `muse extract` on the same store is refused at once, and workers check before each write
that their run still owns the store.

Work is split by shard: one task owns all videos of one shard of `videos/tokens` (and the matching
chunks of `videos/mask` and `videos/done`), so no two processes ever write the same file. Texts are
split the same way by chunk of `texts/embeddings`.

Within a shard, videos are encoded in fixed groups of `videos_per_batch` consecutive videos: one
encoder forward per group (the frames of all its videos), so a GPU sees batches of hundreds of
frames. The groups depend only on the store (never on where a run resumed), so the cached bits do
not depend on interruptions: a resumed run is bit-identical to an uninterrupted one. Decoding and
preprocessing (the CPU work) run ahead of the encoder, in threads or in a pool of processes.

Auto-window rows are not in those groups: the rows of one file form a unit (`grid`) whose distinct
frames are decoded once, encoded in fixed batches and scattered into its rows (same bits on resume).

Failed videos are retried by a later run when their file changed (size or mtime) or with
`--retry-failed`; the ledger moves the old record to `failure_history`. Resume and crash safety:
see `staging`.
"""
