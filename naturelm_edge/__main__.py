"""`python -m naturelm_edge` runs the console script."""

import sys

from naturelm_edge.cli import main

sys.exit(main())
