"""Keep third-party libraries off the network at run time.

Only the download stage may open connections. albumentations (pulled by img2dataset) checks
PyPI for updates in every process, ultralytics pip-installs missing extras, Ray reports usage
stats; each has an environment switch, set here once for this process and passed on to Ray
workers through the runtime environment (see ``pipeline.executor``).
"""

import os

QUIET_NETWORK_ENV: dict[str, str] = {
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "YOLO_AUTOINSTALL": "False",
    "YOLO_OFFLINE": "True",
    "RAY_USAGE_STATS_ENABLED": "0",
    "WANDB_MODE": "disabled",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def quiet_network_env() -> None:
    """Set the switches that the user has not set already (an explicit setting wins)."""
    for name, value in QUIET_NETWORK_ENV.items():
        os.environ.setdefault(name, value)
