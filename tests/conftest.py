"""Test-session settings: the cpu backend's calibration cache goes to a temporary folder, not to
the user's ~/.cache (subprocesses started by tests inherit it)."""

import os
import tempfile


def pytest_configure(config):
    os.environ.setdefault("INTRAIN_CACHE_DIR", tempfile.mkdtemp(prefix="intrain-test-cache-"))
