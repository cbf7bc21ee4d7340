"""The label stage's driver imports no network library: every labeler is built, and its files'
schema and provenance made, in the actor that runs it. The driver plans from names and configs."""

from __future__ import annotations

import json
import subprocess
import sys

from four_m.core.modalities import MODALITIES
from tests.pipeline.conftest import SMALL

NETWORK_LIBRARIES = ("torch", "transformers", "ultralytics")

DRIVER = """
import json, sys
from four_m.core.config import load_config
from four_m.pipeline import label

planned = []

def plan_only(group, config, root, targets, derived_from_random_init):
    # The whole level is planned (pools, targets, resources checked on a running Ray); no actor starts.
    planned.append(sorted(targets[n].folder for n in group))
    return []

label._start_actors = plan_only
root, names, overrides = sys.argv[1], tuple(sys.argv[2].split(",")), sys.argv[3:]
summary = label.run_label(load_config("default", overrides, root=root), only=names, progress=False)
imported = sorted(m for m in {NETWORK_LIBRARIES} if m in sys.modules)
print(json.dumps({{"imported": imported, "planned": planned, "random_init": summary.random_init}}))
"""


def test_the_driver_plans_every_labeler_without_importing_a_network_library(
    tmp_path, photos, make_images_root, small_config
):
    # Every labeler of pixels, plus one that reads labels where they exist (metadata uses det's);
    # sam_edge is left out: it requires sam_instance's labels, which a planned-only run never writes.
    names = [n for n in small_config(tmp_path).label.labelers if not MODALITIES[n].requires]
    root = tmp_path / "root"
    make_images_root(root, photos)
    driver = DRIVER.format(NETWORK_LIBRARIES=NETWORK_LIBRARIES)
    done = subprocess.run(
        [sys.executable, "-c", driver, str(root), ",".join(names), *SMALL],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["imported"] == []
    assert sorted(f for pool in found["planned"] for f in pool) == sorted(f"labels/{n}" for n in names)
    # Random-init weights are known from the config alone, without a labeler to ask.
    assert set(found["random_init"]) == {n for n in names if small_config(tmp_path).label.labeler(n).random_init}
