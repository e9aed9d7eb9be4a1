"""``python -m lightning_prune.report``."""

import sys

from lightning_prune.report.cli import main

sys.exit(main())
