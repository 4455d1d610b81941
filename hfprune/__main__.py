# Copyright hfprune contributors. Apache-2.0.
"""``python -m hfprune ...`` (and ``accelerate launch -m hfprune run RECIPE``): the ``hfprune`` command."""

import sys

from .pipeline.cli import main

sys.exit(main())
