"""flashcheck: numerics verification and fuzzing for fused (flash) attention.

The installed distribution has this one top-level package; its four
subpackages are the repository's top-level folders, mapped in by
``pyproject.toml`` (``[tool.setuptools.package-dir]``):

    flashcheck.kernels      the precision formats, the NumPy algebra, the Triton kernel
    flashcheck.properties   cases, input builders, masks, Hypothesis strategies
    flashcheck.verify       oracle, metrics, bounds, targets, campaign, command line
    flashcheck.reports      case records, summaries, the HTML report, diff

Dependencies run one way: kernels <- properties <- verify, and reports <- verify.
"""

import os as _os

__version__ = "0.1.0"

# In a source checkout (no install, e.g. PYTHONPATH=. on a GPU host) the four
# subpackages live beside this folder rather than inside it: look there too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "verify")) and _os.path.isfile(
    _os.path.join(_root, "verify", "cli.py")
):
    __path__.append(_root)
