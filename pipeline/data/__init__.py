"""Real data: listing and decoding the source images, WebDataset shards with their DALI and parquet indexes, the
class map, the loaders (PIL / DALI), the holdout slice of the train split, the synthetic set's shards, the demo
digits. May import: `pipeline.core`, `pipeline.augment` (crop geometry), `manifests` (atomic writes, records).
"""
