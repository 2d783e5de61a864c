"""`python -m rftengine ...`: the `rftengine` command (also what `torchrun ... -m rftengine train` runs)."""

import sys

from rftengine.cli import main

if __name__ == "__main__":
    sys.exit(main())
