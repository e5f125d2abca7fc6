"""``python -m flashcheck.verify`` (and ``python -m verify`` from a source
checkout): the same command line as ``python -m flashcheck``."""

import sys

from flashcheck.verify.cli import main

sys.exit(main())
