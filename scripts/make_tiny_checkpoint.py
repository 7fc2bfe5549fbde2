#!/usr/bin/env python3
"""Write the tiny random checkpoint (acestep_daemon/tiny.py) into DIR.

Usage: scripts/make_tiny_checkpoint.py DIR [--seed N]
Then e.g. `acestep generate --model-dir DIR ...` runs the whole path in seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from acestep_daemon.tiny import make_tiny_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="folder to write (created if needed)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    args = parser.parse_args(argv)
    print(make_tiny_checkpoint(args.dest, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
