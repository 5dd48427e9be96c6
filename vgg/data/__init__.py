"""Data: the raw ILSVRC-2012 layout (`imagenet`), the generated default in that layout (`synthetic`), ingestion into
WebDataset shards with an index and colour statistics (`ingest`), and the reading side: samples (`samples`,
`tar_reader`), the training and validation batches (`loader`, run by `streams` in the buffers of `batch_buffers`,
yielding `batch`), decoding and cropping (`transforms`, `turbojpeg`, `gpu_decode`) and the network input
(`preprocessing`). The writing and reading sides meet only at the shard format (`shard_format`: the tars,
`OUT/index.json`, `OUT/stats.json`)."""
