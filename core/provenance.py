"""Provenance values that the stages write into their files' metadata and readers compare against."""

RANDOM_INIT = "random-init"
"""``four_m.model`` and ``four_m.revision`` of labels made by a tiny random-init labeler: noise, not
labels. Labelers write it; previews and cards read it to say so loudly."""
