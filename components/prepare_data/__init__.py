"""prepare-data step: source data -> train/eval Parquet shards + manifest (see core.py)."""
