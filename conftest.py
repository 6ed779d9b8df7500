"""Shared pytest set-up: Hypothesis profiles and the device fixture.

Profiles (select with HYPOTHESIS_PROFILE=name; CI=true selects "ci"):
  dev       the default: a few examples per property, for quick local runs
  ci        what .ci/run uses: bounded examples, no deadline, derandomized for reproducible CI
  thorough  long searches, for `pytest -m slow` runs and before releases
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=8, **_common)
settings.register_profile("ci", max_examples=40, derandomize=True, print_blob=True, **_common)
settings.register_profile("thorough", max_examples=200, **_common)
_default = "ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default))


def _devices():
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


@pytest.fixture(params=_devices())
def device(request):
    """Every test that takes `device` runs on CPU, and on CUDA too when torch.cuda.is_available()."""
    return torch.device(request.param)


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """The test models are tiny: intra-op threads only add contention on a small CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _dump_residuals():
    """At the end of the session, merge the residuals the tests logged into $EXPLAIND_RESIDUAL_LOG
    (a JSON file, when that variable is set): the per-family maxima quoted in the README."""
    from explaind_math.testing.residuals import RESIDUALS

    yield
    RESIDUALS.dump()


def pytest_terminal_summary(terminalreporter, config):
    """With -v, or when $EXPLAIND_RESIDUAL_LOG is set: the residuals achieved, per theorem and family."""
    if config.option.verbose > 0 or os.environ.get("EXPLAIND_RESIDUAL_LOG"):
        from explaind_math.testing.residuals import RESIDUALS

        terminalreporter.write_sep("-", "residuals achieved (max per theorem, model family, quantity)")
        terminalreporter.write_line(RESIDUALS.summary())
