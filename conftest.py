"""Fixtures shared by the tests (tests/) and the benchmarks (bench/)."""

import os

import pytest

from fmnist import FmnistError, data


@pytest.fixture(scope="session")
def real_data():
    """The four real Fashion-MNIST files. Absent: the test is skipped, except under CI, where it fails."""
    try:
        return data.locate(download=False)
    except FmnistError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the real Fashion-MNIST (.ci/run installs it): {e}")
        pytest.skip(f"needs the real Fashion-MNIST: {e}")
