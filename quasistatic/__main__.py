"""``python -m quasistatic`` (and ``torchrun -m quasistatic``): the console script."""

import sys

from .cli import main

sys.exit(main())
