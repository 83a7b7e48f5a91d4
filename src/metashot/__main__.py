"""``python -m metashot`` (and ``torchrun -m metashot``) runs the command line."""

import sys

from metashot.cli import main

sys.exit(main())
