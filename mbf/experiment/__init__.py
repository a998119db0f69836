"""The experiment application behind the ``mbf`` command, built on the library core.

Modules, in import order (each imports only those above it and the core):

- ``methods``: method presets, name → ``ContinualConfig`` (``None``: the multi-task baseline);
- ``metrics``: exact match, Rouge-L, AA, BWT and FWT;
- ``tasks``: ``Task``/``Example`` and the prompt format (only the input is ever cut);
- ``suites``: ``load_suite`` and the suites: ``real`` (installed data packages), ``domains`` and
  ``conflict`` (generated), ``olora`` (the O-LoRA/SAPT folders);
- ``cpu_dtype``: ``--dtype auto`` on a CPU, measured (the model's linears in each dtype) and cached;
- ``models``: the embedded SmolLM2 (converted once, cached), local checkpoints, the QLoRA base;
- ``batches``: ``Codec`` (text ↔ ids) and left-padded batches;
- ``train``: ``TrainOptions`` (frozen), the answer-only loss, the optimizer loop;
- ``presets``: the training presets, ``Preset(TrainOptions, LoRAConfig)`` instances (quick, paper);
- ``evaluate``: every test example scored by greedy decoding and/or by ranking the options (one shared
  prompt pass, the task's head cached once per batch), a saved run re-evaluated;
- ``zero_shot``: the bare model's records (FWT's reference), cached by model and test-set fingerprint;
- ``predictions``: the per-example predictions of every evaluation (``mbf-predictions/2``), a finished
  run's packed into one ``predictions.json.gz``;
- ``results``: the ``results.json`` schema (``mbf-continual-results/1``);
- ``stats`` and ``paired``: paired-bootstrap intervals (pure), and those of ``mbf compare``;
- ``plots`` and ``report``: a run's markdown and heatmap, comparisons of runs;
- ``run``: ``run_continual``, a whole continual run, resumable after a crash.

Needs the ``app`` extra (transformers, tqdm, matplotlib): ``pip install 'mbf-lora[app]'``.
"""

from mbf._optional import EXPERIMENT, require

require("mbf.experiment", EXPERIMENT)
