#!/usr/bin/env python3
"""Write the tiny random checkpoint into DIR: `acestep make-tiny-checkpoint DIR [--seed N]`.

Then e.g. `acestep generate --model-dir DIR ...` runs the whole path in seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from acestep_daemon.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["make-tiny-checkpoint", *sys.argv[1:]]))
