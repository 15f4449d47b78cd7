"""`python -m condense_graph ...` is the `condense-graph` command line."""

import sys

from condense_graph.cli import main

sys.exit(main())
