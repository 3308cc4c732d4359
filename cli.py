"""`python cli.py fit --config configs/da_microf1.yaml` — see `python cli.py --help`."""

import sys

from aff_lightning.cli import main

if __name__ == "__main__":
    sys.exit(main())
