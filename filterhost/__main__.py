"""Run filterhost as ``python -m filterhost``."""

import sys

from filterhost.cli import main

sys.exit(main())
