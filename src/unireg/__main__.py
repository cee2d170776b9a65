"""``python -m unireg`` is the ``unireg`` command."""

import sys

from unireg.cli import main

sys.exit(main())
