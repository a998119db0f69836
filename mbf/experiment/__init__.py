"""The experiment application behind the ``mbf`` command, built on the library core.

Modules, in import order (each imports only those above it and the core):

- ``methods``: method presets, name → ``ContinualConfig`` (``None``: the multi-task baseline);
- ``presets``: the training presets (``quick``, the paper's);
- ``metrics``: exact match, Rouge-L, AA, BWT and FWT;
- ``tasks``: ``Task``/``Example`` and the prompt format (only the input is ever cut);
- ``suites``: ``load_suite`` and the suites: ``real`` (installed data packages), ``domains`` and
  ``conflict`` (generated), ``olora`` (the O-LoRA/SAPT folders);
- ``models``: the embedded SmolLM2 (converted once, cached), local checkpoints, the QLoRA base;
- ``batches``: ``Codec`` (text ↔ ids) and left-padded batches;
- ``train``: ``TrainOptions``, the answer-only loss, the optimizer loop;
- ``evaluate``: greedy decoding with the KV cache, each task's score, a saved run re-evaluated;
- ``zero_shot``: the bare model's scores (FWT's reference), cached by model and test-set fingerprint;
- ``results``: the ``results.json`` schema (``mbf-continual-results/1``);
- ``plots`` and ``report``: a run's markdown and heatmap, comparisons of runs;
- ``run``: ``run_continual``, a whole continual run, resumable after a crash.

Needs the ``app`` extra (transformers, tqdm, matplotlib): ``pip install 'mbf-lora[app]'``.
"""

from mbf._optional import EXPERIMENT, require

require("mbf.experiment", EXPERIMENT)
