"""Data: the raw ILSVRC-2012 layout (`imagenet`), the generated default in that layout (`synthetic`), ingestion into
WebDataset shards with an index and colour statistics (`shards`), and the reading side (`transforms`, `loader`).
The writing and reading sides meet only at the on-disk shard contract (`OUT/index.json`, `OUT/stats.json`, tars)."""
