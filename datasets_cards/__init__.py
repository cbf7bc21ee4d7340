"""Dataset cards generated from each run's statistics: a later stage."""
