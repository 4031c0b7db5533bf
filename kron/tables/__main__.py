"""``python -m kron.tables`` is ``kron-tables``."""

import sys

from kron.tables.cli import main

sys.exit(main())
