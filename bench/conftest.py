"""The one fixture every benchmark file shares: ``rows``, where each measured row is appended.

Each ``test_bench_*.py`` names in ``REFERENCES`` (op → provider) what its ratios are taken against
(see ``mbf.bench``: ``ms / ms_of_reference``, larger = slower) and measures that provider first.
"""

from __future__ import annotations

import pytest

from mbf.bench.rows import RowWriter


@pytest.fixture(scope="module")
def rows(request):
    """A ``RowWriter`` for the module: rows reach the results file as they are measured."""
    writer = RowWriter(references=getattr(request.module, "REFERENCES", {}))
    yield writer
    if len(writer):
        print("\n" + writer.summary())
