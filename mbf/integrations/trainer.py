"""transformers ``Trainer`` integration: one Trainer per task, SLAO's boundaries and state in its callbacks.

Recipe (README, "With the transformers Trainer")::

    cl = mbf.ContinualLoRA(mbf.inject(model, cfg))
    for task in tasks:
        trainer = Trainer(model=model, args=args_for(task), train_dataset=task.train,
                          eval_dataset=task.eval, callbacks=[SLAOCallback(cl)])
        trainer.train()          # begin_task() on train begin, end_task() on train end
        trainer.evaluate()       # with the merged adapter: what inference uses

What the callback does:

- ``on_train_begin``: resumes the SLAO state of the checkpoint the Trainer resumed from (when
  there is one), then ``begin_task()`` unless that checkpoint was taken inside the task;
  evaluation while training uses ``"preview"`` (what the merge of this task would give).
- ``on_train_end``: ``end_task()`` (the time-aware merge), then saves SLAO's state into
  ``state_dir`` (default ``<output_dir>/slao``): a run killed between two ``trainer.train()`` calls
  resumes with ``ContinualLoRA.load(model, state_dir)``; evaluation then uses the merged adapter.
- ``on_save``: SLAO's state beside the Trainer's checkpoint (``checkpoint-N/slao``).

The Trainer's checkpoints and ``save_model()`` hold the adapters alone, callback or not: ``inject``
makes the model's ``save_pretrained`` write them (``mbf.export``), in PEFT's format plus the one
shard of LoRA tensors that the Trainer's resume loads.

A model loaded in 4 bits by bitsandbytes and injected has trainable adapters, but transformers
only recognises PEFT's: build its Trainer inside ``with adapters_attached(model):``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from mbf.continual import ContinualLoRA
from mbf.export import INDEX, SHARD

__all__ = ["INDEX", "SHARD", "SLAOCallback", "adapters_attached"]


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
        raise ImportError("SLAOCallback needs transformers: pip install mbf-lora[app]") from err
    return TrainerCallback


class SLAOCallback(_trainer_callback_base()):
    """SLAO's task boundaries and state for a transformers ``Trainer`` (one Trainer per task).

    Args:
        continual: the ``ContinualLoRA`` of the model the Trainer trains.
        state_dir: where SLAO's state is saved after every task (default ``<output_dir>/slao``).
    """

    def __init__(self, continual: ContinualLoRA, state_dir: str | Path | None = None) -> None:
        self.cl = continual
        self.state_dir = state_dir

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:
            self._resume(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        if not self.cl.in_task:
            self.cl.begin_task()
        self.cl.set_eval_adapter("preview")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.cl.end_task()
        self.cl.set_eval_adapter("auto")  # the merged adapter: what inference uses
        self.cl.save(self.state_dir or Path(args.output_dir) / "slao")  # every rank calls it; rank 0 writes
        return control

    def on_save(self, args, state, control, **kwargs):
        self.cl.save(Path(args.output_dir) / f"checkpoint-{state.global_step}" / "slao")
        return control

    def _resume(self, checkpoint: Path) -> None:
        """Restore the SLAO state saved with the checkpoint the Trainer resumed from."""
        if not (checkpoint / "slao" / "continual.json").is_file():
            raise FileNotFoundError(
                f"{checkpoint}: resuming a task needs the SLAO state its checkpoint holds (slao/); "
                "resume with resume_from_checkpoint=True or a checkpoint-N folder of args.output_dir"
            )
        self.cl.restore(checkpoint / "slao")
