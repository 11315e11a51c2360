"""``python -m bioprop``: the same command line as the ``bioprop`` console script."""
import sys

from .cli import main

sys.exit(main())
