"""``python -m pigateway`` is the same as the ``pigateway`` command."""

import sys

from pigateway.cli import main

sys.exit(main())
