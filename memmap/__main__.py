"""``python -m memmap``: see ``memmap.cli``."""

import sys

from memmap.cli import main

sys.exit(main())
