"""Fixtures shared by several test modules."""

import subprocess
import sys

import pytest

from tests.unit_tests.models.dist_harness import ROOT, job_env


@pytest.fixture(scope="session")
def energon_data(tmp_path_factory):
    """The generated energon dataset (make_sample_energon_dataset.py), made once per session."""
    out = tmp_path_factory.mktemp("energon") / "ds"
    subprocess.run([sys.executable, str(ROOT / "examples/mimo/scripts/make_sample_energon_dataset.py"),
                    str(out), "--samples", "256"], check=True, capture_output=True, timeout=120,
                   env=job_env())
    return out
