"""``python -m dynaslice.cli`` (what ``torchrun -m dynaslice.cli train ...`` runs)."""

import sys

from dynaslice.cli import main

sys.exit(main())
