"""``python -m dynaslice ...``: the ``dynaslice`` command."""

import sys

from dynaslice.cli import main

sys.exit(main())
