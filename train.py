#!/usr/bin/env python
"""`python train.py --mesh=2x4`: the same command as `jdmt-train` (jdmt/cli/train.py)."""

import sys

from jdmt.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
