"""Shared benchmark plumbing for ``bench/``: re-exported from ``mbf.benchmark`` (the installed home,
so that ``mbf bench`` can use it too). A row is a flat dict: op, provider, mode, shape, M, r, dtype,
device, ms (median), p20, p80, tflops or gbps, peak_mem_bytes, ratio_to_floor, versions and date.
"""

from mbf.benchmark import (  # noqa: F401
    RESULTS_DIR,
    append_rows,
    device_name,
    make_row,
    peak_memory,
    results_path,
    slug,
    time_fn,
    versions,
)
