"""``python -m covr_lightning`` runs the CLI."""

import sys

from covr_lightning.cli import main

sys.exit(main())
