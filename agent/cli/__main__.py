"""``python -m agent.cli``: the same entry point as the ``accelguard`` console script."""

import sys

from agent.cli import main

sys.exit(main())
