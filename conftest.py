"""Hypothesis profiles and GPU skipping for the whole test suite.

Profiles (choose with HYPOTHESIS_PROFILE or --hypothesis-profile):
  dev      quick local runs, random seeds, prints reproduction blobs
  ci       derandomized and small enough for the CPU CI budget
  nightly  many examples, database kept between runs (HYPOTHESIS_DATABASE_DIR)
"""

import os

from flashcheck.verify.scaleout import pin_worker_gpu

# One GPU per pytest-xdist worker, chosen before anything initialises CUDA.
pin_worker_gpu()

import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, Verbosity, settings  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "dev",
    max_examples=30,
    deadline=None,
    print_blob=True,
    suppress_health_check=_SLOW_OK,
)
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=_SLOW_OK,
)
settings.register_profile(
    "nightly",
    max_examples=400,
    deadline=None,
    print_blob=True,
    database=DirectoryBasedExampleDatabase(
        os.environ.get("HYPOTHESIS_DATABASE_DIR", ".hypothesis/examples")
    ),
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=_SLOW_OK,
    verbosity=Verbosity.normal,
)
settings.register_profile("long", parent=settings.get_profile("ci"), max_examples=250)
_profile = os.environ.get("HYPOTHESIS_PROFILE", "dev")
if os.environ.get("HYPOTHESIS_MAX_EXAMPLES"):
    # Same profile, another example count (a shorter or longer nightly).
    _name = f"{_profile}-{os.environ['HYPOTHESIS_MAX_EXAMPLES']}"
    settings.register_profile(_name, parent=settings.get_profile(_profile),
                              max_examples=int(os.environ["HYPOTHESIS_MAX_EXAMPLES"]))
    _profile = _name
settings.load_profile(_profile)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _interpreter_too_old() -> str | None:
    """Why the Triton kernel cannot run under this host's interpreter, or None."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    from flashcheck.kernels import triton_flash

    if triton_flash.interpreter_supported():
        return None
    import triton

    need = ".".join(map(str, triton_flash.INTERPRETER_MIN_TRITON))
    return f"Triton {triton.__version__}'s interpreter cannot run the kernel (needs >= {need})"


def pytest_collection_modifyitems(config, items):
    old = _interpreter_too_old() if any("interpreted_kernel" in i.keywords for i in items) else None
    if old:
        for item in items:
            if "interpreted_kernel" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=old))
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
