"""``python -m enn_neuro`` is the ``enn-neuro`` command."""

import sys

from enn_neuro.cli import main

sys.exit(main())
