"""Ray jobs that run the stages over shards: download now; label and tokenize build on it."""
