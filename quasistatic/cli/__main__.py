"""``python -m quasistatic.cli``: the console script without installing it."""

import sys

from . import main

sys.exit(main())
