"""The 4M trainer (Lightning) over the Parquet token store; generation and evaluation with a trained run."""
