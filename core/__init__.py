"""What every stage shares: config, dataset root and resume, stage summaries, the CLI."""
