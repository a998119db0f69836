"""``python -m mbf.bench``: the same as ``mbf bench``."""

from mbf.bench.suite import main

raise SystemExit(main())
