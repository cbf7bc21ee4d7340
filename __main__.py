"""``python -m four_m <verb>``: the one entry point of the project."""

from four_m.cli import main

raise SystemExit(main())
