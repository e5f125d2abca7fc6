"""``python -m flashcheck``: the command line (`flashcheck.verify.cli`)."""

import sys

from flashcheck.verify.cli import main

sys.exit(main())
