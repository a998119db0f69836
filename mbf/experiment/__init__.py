"""The experiment application behind the ``mbf`` command, built on the library core.

Modules, in import order (each imports only those above it and the core):

- ``methods``: method presets, name → ``ContinualConfig`` (``None``: the multi-task baseline);
- ``metrics``: exact match, AA and BWT;
- ``tasks``: ``Task``/``Example``, the built-in suite and the O-LoRA/SAPT folder loader;
- ``models``: the embedded SmolLM2 (converted once, cached), local checkpoints, the QLoRA base;
- ``batches``: ``Codec`` (text ↔ ids) and left-padded batches;
- ``train``: ``TrainOptions``, the answer-only loss, the optimizer loop;
- ``evaluate``: greedy decoding with the KV cache, exact-match accuracy, a saved run re-evaluated;
- ``results``: the ``results.json`` schema (``mbf-continual-results/1``);
- ``plots`` and ``report``: a run's markdown and heatmap, comparisons of runs;
- ``run``: ``run_continual``, a whole continual run, resumable after a crash.

Needs the ``app`` extra (transformers, tqdm, matplotlib): ``pip install 'mbf-lora[app]'``.
"""

from mbf._optional import EXPERIMENT, require

require("mbf.experiment", EXPERIMENT)
