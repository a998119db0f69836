"""Markers of the compile checks: the full matrix (``-m compile_full``) stays out of the default run."""

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "compile_full: every kernel variant x config for sm_90 and sm_80 (`make compile-check`)"
    )


def pytest_collection_modifyitems(config, items):
    if "compile_full" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="the full compile matrix runs with -m compile_full (make compile-check)")
    for item in items:
        if "compile_full" in item.keywords:
            item.add_marker(skip)
