"""four_m: the data pipeline and trainer for 4M-style massively multimodal masked models.

The repository root is this package: the stage folders (``pipeline/``, ``labelers/``,
``tokenize/``, ``train/``) are its subpackages, ``core/`` holds what every stage shares
(config, dataset root and resume, summaries), and ``cli.py`` the verbs.
"""

from four_m.core.offline import quiet_network_env

__version__ = "0.1.0"

# Before any third-party import: several libraries phone home or pip-install at import time.
quiet_network_env()
