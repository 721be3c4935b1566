"""`corral serve` tunes the cyclic garbage collector once it has started (cli/serve.py)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import gc
from corral.cli.serve import YOUNG_GC_THRESHOLD, tune_garbage_collection
import corral.api  # what a started server has loaded
before = gc.get_freeze_count()
tune_garbage_collection()
assert before == 0, before
assert gc.get_freeze_count() > 50_000, gc.get_freeze_count()  # the modules and app, no longer walked
assert gc.get_threshold()[0] == YOUNG_GC_THRESHOLD, gc.get_threshold()
print("ok")
"""


def test_started_objects_are_frozen_and_young_collections_are_rarer() -> None:
    # In a process of its own: freezing the test process would keep every test's garbage.
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
