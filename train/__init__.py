"""The 4M trainer (Lightning) over the Parquet token store: a later stage."""
