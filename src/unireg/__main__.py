"""``python -m unireg`` is the ``unireg`` command."""

from unireg.cli import console

console()
