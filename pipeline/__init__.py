"""The stage drivers over shards on Ray (download, label, tokenizer training, tokenize): the only Ray user."""
