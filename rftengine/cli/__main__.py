"""`python -m rftengine.cli`: the `rftengine` command."""

import sys

from rftengine.cli import main

sys.exit(main())
