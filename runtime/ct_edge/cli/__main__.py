"""`python -m ct_edge.cli` is the `ct-edge` command."""

import sys

from . import main

sys.exit(main())
