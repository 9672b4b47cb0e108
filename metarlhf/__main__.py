"""``python -m metarlhf ...``: the same as the ``metarlhf`` console script."""

import sys

from metarlhf.cli import main

sys.exit(main())
