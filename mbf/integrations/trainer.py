"""transformers ``Trainer`` integration: one Trainer per task, any continual strategy driven by one callback.

Recipe (README, "With the transformers Trainer")::

    cl = mbf.ContinualLoRA(mbf.inject(model, cfg))      # or OLoRA, InfLoRA, TaskMergeLoRA, Replay(...)
    for task in tasks:
        trainer = Trainer(model=model, args=args_for(task), train_dataset=task.train,
                          eval_dataset=task.eval, callbacks=[ContinualCallback(cl)])
        trainer.train()          # begin_task() on train begin, end_task() on train end
        trainer.evaluate()       # with the adapter inference uses (the strategy's merged())

``ContinualCallback`` runs the strategy protocol (``mbf.strategies.base``) in the order of ``mbf continual``'s
loop, with its pieces (``mbf.strategies.loop``: ``open_task``, the step hooks, ``close_task``):

- ``on_init_end``: refuses a combination that cannot work (named below), and lets exactly the next task's
  trainable factors require grad, so that the optimizer the Trainer builds holds them (the same
  parameter groups in a resumed process, whose optimizer state must fit them).
- ``on_train_begin``: resumes the strategy state of the checkpoint the Trainer resumed from (if any); takes
  a replay dataset (``Replay.dataset``: the strategy checks its buffers); ``observe_inputs`` over the
  Trainer's training data (InfLoRA: its ``train_dataloader``'s dataset and collator, one example at a time
  so that no padding reaches a layer, the model in eval mode, no gradient, the RNG left as it was); then
  ``begin_task()``. SLAO evaluates with ``"preview"`` while training (what the merge of this task gives).
- ``on_step_begin``: the strategy's extra loss term (O-LoRA's regulariser), once per optimizer step: its
  gradient is added to the trainable adapters' ``.grad`` before the step's micro-batches (times the fp16
  loss scale when a GradScaler runs), so it joins clipping and counts once per step whatever the Trainer's
  loss normalisation (gradient accumulation, ``num_items_in_batch``, ``compute_loss_func``, label
  smoothing, a subclass's ``compute_loss``). The logged loss is the task loss alone, as ``mbf continual``'s.
- ``on_step_end``: ``after_step()`` (SLAO's strict mode projects the A updates), before any checkpoint.
- ``on_save``: the strategy's state as the task began, beside the Trainer's checkpoint
  (``checkpoint-N/<strategy_name>``); the Trainer's own checkpoint holds the adapters being trained. A
  resume restores that state, begins the task again (``observe_inputs`` included) and puts the checkpoint's
  adapters back: every strategy resumes mid-task, also those that cannot save inside a task.
- ``on_train_end``: ``observe_inputs`` again (InfLoRA), ``end_task()``, then the state into ``state_dir``
  (default ``<output_dir>/<strategy_name>``): a run killed between two ``trainer.train()`` calls resumes
  with ``mbf.strategies.load_strategy(model, state_dir)`` (``Replay.load`` for a replay). From then on
  ``model.eval()`` computes with the adapter inference uses.

Refused before training, with the reason: a loss-term strategy (O-LoRA) under DeepSpeed (the engine owns
the gradients), and every strategy but SLAO's ``ContinualLoRA`` under FSDP (their per-task LoRAs, merges and
memories hold whole tensors). Replay: give the Trainer ``cl.dataset([task 1's data, ..., this task's])``.

The Trainer's checkpoints and ``save_model()`` hold the adapters alone, callback or not: ``inject``
makes the model's ``save_pretrained`` write them (``mbf.export``), in PEFT's format (when one adapter per
layer describes the model) plus the one shard of LoRA tensors that the Trainer's resume loads.

A model loaded in 4 bits by bitsandbytes and injected has trainable adapters, but transformers
only recognises PEFT's: build its Trainer inside ``with adapters_attached(model):``.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import torch

from mbf.export import INDEX, SHARD
from mbf.strategies import loop
from mbf.strategies.base import REQUIRED, StrategyDefaults, hook
from mbf.strategies.replay import ReplayDataset
from mbf.strategies.slao import ContinualLoRA

__all__ = ["INDEX", "SHARD", "ContinualCallback", "SLAOCallback", "adapters_attached"]


@contextlib.contextmanager
def adapters_attached(model):
    """Let ``Trainer(model=...)`` accept a bitsandbytes-quantised model that carries mbf's adapters.

    transformers refuses "purely quantized" models unless they are PEFT models; it checks once, in
    ``Trainer.__init__``. Inside this block the model is reported as not quantised to that check.

    Raises:
        ValueError: the model has no trainable parameters (inject LoRA layers first).
    """
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters: mbf.inject(model, LoRAConfig(...)) first")
    quantized = getattr(model, "is_quantized", False)
    model.is_quantized = False
    try:
        yield model
    finally:
        model.is_quantized = quantized


def _trainer_callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError as err:
        raise ImportError("ContinualCallback needs transformers: pip install mbf-lora[app]") from err
    return TrainerCallback


def _innermost(strategy):
    """The strategy a plugin (``Replay``) wraps, down to the one that owns the adapters."""
    while getattr(type(strategy), "keeps_examples", False) and hasattr(strategy, "strategy"):
        strategy = strategy.strategy
    return strategy


def _adds_loss(strategy) -> bool:
    return getattr(type(_innermost(strategy)), "loss_term", None) is not StrategyDefaults.loss_term


class ContinualCallback(_trainer_callback_base()):
    """Any continual strategy's protocol for a transformers ``Trainer`` (one Trainer per task; see the module
    docstring for what each event does).

    Args:
        strategy: the strategy of the model the Trainer trains (``mbf.ContinualLoRA``, ``OLoRA``,
            ``InfLoRA``, ``TaskMergeLoRA``, ``Replay(...)``, ``ExperienceReplay``: ``mbf.strategies``).
        state_dir: where the strategy's state is saved after every task (default
            ``<output_dir>/<strategy_name>``).

    Raises:
        TypeError: ``strategy`` lacks the protocol's members.
    """

    def __init__(self, strategy, state_dir: str | Path | None = None) -> None:
        missing = [m for m in REQUIRED if not hasattr(strategy, m)]
        if missing:
            raise TypeError(f"ContinualCallback: {type(strategy).__name__} is not a continual strategy "
                            f"(lacks {', '.join(missing)}; see mbf.strategies)")  # fmt: skip
        self.cl = strategy
        self.state_dir = state_dir
        self._snapshot: tempfile.TemporaryDirectory | None = None  # the state as the task began

    @property
    def name(self) -> str:
        """The strategy's folder in a checkpoint and the default ``state_dir``'s name."""
        return self.cl.strategy_name

    # -- events -----------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, **kwargs):
        self._refuse(args)
        if not self.cl.in_task:  # the optimizer the Trainer builds takes what requires grad now
            trainable = {id(p) for p in self.cl.trainable_parameters()}  # the next task's, as begin_task sets
            for layer in self.cl.layers.values():
                for p in (layer.lora_A, layer.lora_B):
                    p.requires_grad_(id(p) in trainable)
        return control

    def on_train_begin(self, args, state, control, train_dataloader=None, optimizer=None, **kwargs):
        self._refuse(args)
        resumed = state.global_step > 0
        trained = self._adapters() if resumed else None  # what the Trainer loaded from its checkpoint
        if resumed:
            self._resume(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        self._close_snapshot()
        if not self.cl.in_task:  # (a legacy SLAO checkpoint resumes inside its task)
            self._take_dataset(getattr(train_dataloader, "dataset", None))
            self._snapshot = tempfile.TemporaryDirectory(prefix="mbf-task-start-")
            self.cl.save(self._snapshot.name)
            loop.open_task(self.cl, lambda: self._run_inputs(train_dataloader))
            if trained is not None:
                self._put_adapters(trained)
        if callable(getattr(self.cl, "set_eval_adapter", None)):
            self.cl.set_eval_adapter("preview")  # SLAO: what the merge of this task would give
        self._check_optimizer(optimizer)
        return control

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        term = hook(self.cl, "loss_term")() if self.cl.in_task else None
        if term is None or not term.requires_grad:
            return control
        params = [p for p in self.cl.trainable_parameters() if p.requires_grad]
        grads = torch.autograd.grad(term, params, allow_unused=True)
        scaler = getattr(optimizer, "scaler", None)  # accelerate's fp16 GradScaler scales the task loss
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is None:
                    continue
                g = g.to(p.dtype) * scale
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.cl.in_task:
            hook(self.cl, "after_step")()
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.name
        if self._snapshot is not None:
            if state.is_world_process_zero:
                shutil.copytree(self._snapshot.name, folder, dirs_exist_ok=True)
        else:  # the task was begun before trainer.train(): the state as it is (SLAO can save mid-task)
            self.cl.save(folder)
        return control

    def on_train_end(self, args, state, control, train_dataloader=None, **kwargs):
        if self.cl.in_task:
            loop.close_task(self.cl, lambda: self._run_inputs(train_dataloader))
        if callable(getattr(self.cl, "set_eval_adapter", None)):
            self.cl.set_eval_adapter("auto")  # the merged adapter: what inference uses
        folder = self.state_dir or Path(args.output_dir) / self.name
        if getattr(_innermost(self.cl), "distributed", False) or state.is_world_process_zero:
            self.cl.save(folder)  # SLAO under DDP/FSDP: every rank calls it; rank 0 writes
        self._close_snapshot()
        return control

    # -- helpers ----------------------------------------------------------------------------------

    def _refuse(self, args) -> None:
        """Raise ValueError, naming the reason, for a strategy that cannot train under these arguments."""
        name = self.cl.strategy_name
        if getattr(args, "deepspeed", None) and _adds_loss(self.cl):
            raise ValueError(
                f"{name} adds a loss term, which ContinualCallback adds to the adapters' gradients once per "
                "optimizer step; under DeepSpeed the engine owns the gradients: train without DeepSpeed"
            )
        if getattr(args, "fsdp", None) and not isinstance(_innermost(self.cl), ContinualLoRA):
            raise ValueError(
                f"{name} keeps whole per-task tensors (frozen LoRAs, merges, memories) that FSDP would "
                "shard: train it without FSDP (DDP replicates them), or use SLAO (mbf.ContinualLoRA)"
            )

    def _take_dataset(self, dataset) -> None:
        """A replay checks the Trainer's dataset (its ``ReplayDataset``); every strategy its task."""
        if getattr(type(self.cl), "keeps_examples", False):
            self.cl.check_dataset(dataset)
            return
        if isinstance(dataset, ReplayDataset) and dataset.task_index != self.cl.task_index:
            raise ValueError(
                f"the Trainer's ReplayDataset is task {dataset.task_index + 1}'s, but {self.name}'s next "
                f"task is {self.cl.task_index + 1}"
            )

    def _run_inputs(self, train_dataloader) -> None:
        """Run the model over the Trainer's training examples (its dataloader's dataset and collator), one at
        a time, in eval mode; the RNG (a collator may draw) is left as it was."""
        if train_dataloader is None:
            raise RuntimeError(f"{self.name} watches the task's inputs: the Trainer gave no train_dataloader")
        dataset, collate = train_dataloader.dataset, train_dataloader.collate_fn
        model = self.cl.model
        device = next(p.device for p in model.parameters())
        was_training = model.training
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        indexed = hasattr(dataset, "__len__") and not isinstance(dataset, torch.utils.data.IterableDataset)
        examples = (dataset[i] for i in range(len(dataset))) if indexed else iter(dataset)
        model.eval()
        try:
            with torch.no_grad():
                for example in examples:
                    batch = collate([example])
                    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()
                             if k != "labels"}  # fmt: skip
                    model(**batch)
        finally:
            model.train(was_training)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)

    def _adapters(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(m.lora_A.detach().clone(), m.lora_B.detach().clone()) for m in self.cl.layers.values()]

    @torch.no_grad()
    def _put_adapters(self, adapters) -> None:
        for layer, (A, B) in zip(self.cl.layers.values(), adapters):
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)

    def _check_optimizer(self, optimizer) -> None:
        if optimizer is None:
            return
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in self.cl.trainable_parameters() if p.requires_grad and id(p) not in held]
        if missing:
            raise RuntimeError(
                f"{self.name}: the Trainer's optimizer lacks {len(missing)} of the task's trainable adapter "
                "tensors (they did not require grad when it was built): give ContinualCallback to the "
                "Trainer's callbacks=[...] so that it prepares them before the optimizer is built"
            )

    def _close_snapshot(self) -> None:
        if self._snapshot is not None:
            self._snapshot.cleanup()
            self._snapshot = None

    def _resume(self, checkpoint: Path) -> None:
        """Restore the strategy state saved with the checkpoint the Trainer resumed from."""
        if not (checkpoint / self.name / "continual.json").is_file():
            raise FileNotFoundError(
                f"{checkpoint}: resuming a task needs the {self.name} state its checkpoint holds "
                f"({self.name}/); "
                "resume with resume_from_checkpoint=True or a checkpoint-N folder of args.output_dir"
            )
        self.cl.restore(checkpoint / self.name)


class SLAOCallback(ContinualCallback):
    """``ContinualCallback`` under its first name (it drives any strategy, SLAO's ``ContinualLoRA`` included).

    Args:
        continual: the strategy of the model the Trainer trains (a ``ContinualLoRA`` for SLAO).
        state_dir: where the state is saved after every task (default ``<output_dir>/<strategy_name>``:
            ``<output_dir>/slao`` for SLAO).
    """

    def __init__(self, continual, state_dir: str | Path | None = None) -> None:
        super().__init__(continual, state_dir)
