"""``python -m gatedlora ...`` runs the ``gatedlora`` command."""
import sys

from .cli import main

sys.exit(main())
