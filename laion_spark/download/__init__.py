"""Stage 2: `candidates` -> `images`.

Split as img2dataset splits it: `safety` (which addresses may be contacted, pinned connections),
`fetch` (HTTP with deadlines, caps, opt-out headers, per-host politeness), `resize` (Pillow:
header checks before decode, EXIF, resize modes, encode), `downloader` (one shard's Arrow batches
in, Arrow batches out, thread pools inside), `job` (the thin Spark layer) and `webdataset`
(export to tar shards).
"""
