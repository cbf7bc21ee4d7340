"""Dataset cards generated from a run's statistics (``make card``): stats -> plots -> README.md."""
