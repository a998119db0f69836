"""The measurement library: every benchmark of mbf-lora writes its rows and draws its plots through it.

A row is a flat dict: ``op``, ``provider``, ``mode``, ``shape``, ``M``, ``r``, ``dtype``, ``device``,
``ms`` (median), ``p20``, ``p80``, a physical rate where one applies (``tflops``, ``gbps``,
``tokens_per_s``), ``peak_mem_bytes``, ``date`` and ``versions``. Rows are appended to
``bench/results/<device>-<date>.json`` one by one, as each is measured.

**One ratio convention.** A ratio is ``ms / ms_of_reference``, the reference measured in the same
run, same case (shape, tokens, rank, mode): **larger = slower**.

- ``ratio_to_floor`` — "× floor": against the plain frozen linear (provider ``floor``), the least
  any LoRA layer can cost;
- ``ratio_to_baseline`` with ``baseline`` naming the reference — "× PEFT" (``peft``), "× per-layer
  loop" (``torch-loop``, ``per-layer-loop``): against what one would use without mbf.

Each op names its reference provider, which is measured before the others so that every row's
ratio is known when the row is written.

Modules: ``rows`` (results files, devices, ratios), ``timing``, ``providers`` (PEFT and bitsandbytes
layers to measure against), ``train_step`` (a whole training step), ``boundary`` (SLAO's task
boundary for a whole model), ``suite`` (``mbf bench``), ``plot`` (one plotter for every op) and
``readme`` (the performance tables of ``docs/performance.md``: ``python -m mbf.bench.readme``).
Needs the ``app`` extra: ``pip install 'mbf-lora[app]'``.
"""

from mbf._optional import BENCH, require

require("mbf.bench", BENCH)
