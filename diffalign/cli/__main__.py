"""``python -m diffalign.cli``: the ``diffalign`` command (as ``python -m diffalign``)."""

import sys

from diffalign.cli import main

sys.exit(main())
