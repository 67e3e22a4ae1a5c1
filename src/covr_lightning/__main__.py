"""``python -m covr_lightning`` runs the CLI."""

import sys

from covr_lightning.cli import main

if __name__ == "__main__":  # a spawned fine-tune process imports this module: it must not rerun
    sys.exit(main())
