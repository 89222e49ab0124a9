"""``python -m lowbit``: the ``lowbit`` command line (:mod:`lowbit.cli`)."""
import sys

from .cli import main

sys.exit(main())
