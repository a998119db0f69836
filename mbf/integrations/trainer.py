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
- ``on_train_end``: ``end_task()`` (the time-aware merge); evaluation then uses ``"merged"``.
- While training, the Trainer's checkpoints hold only the adapters and the SLAO state, not the
  base model: ``checkpoint-N/`` gets the LoRA tensors as a one-shard checkpoint (which the
  Trainer's own resume loads into the model), ``slao/`` (``ContinualLoRA.save``) and the model's
  ``config.json``. This is done by the model's ``save_pretrained`` being replaced on that one
  instance between train begin and train end (restored afterwards; no class is changed).

A model loaded in 4 bits by bitsandbytes and injected has trainable adapters, but transformers
only recognises PEFT's: build its Trainer inside ``with adapters_attached(model):``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from mbf.continual import ContinualLoRA
from mbf.io import atomic_save_safetensors, atomic_write_text

__all__ = ["SLAOCallback", "adapters_attached"]

SHARD = "mbf-adapters-00001-of-00001.safetensors"
INDEX = "model.safetensors.index.json"  # the name the Trainer's resume looks for (sharded checkpoints)


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
    """SLAO's task boundaries and adapter-only checkpoints for a transformers ``Trainer`` (one per task).

    Args:
        continual: the ``ContinualLoRA`` of the model the Trainer trains.
        adapter_only_checkpoints: replace the Trainer's full-model checkpoints by the adapters and
            the SLAO state (default; see the module docstring).
    """

    def __init__(self, continual: ContinualLoRA, adapter_only_checkpoints: bool = True) -> None:
        self.cl = continual
        self.adapter_only = adapter_only_checkpoints
        self._saved_save_pretrained = None

    # -- Trainer events -------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:
            self._resume(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        if not self.cl.in_task:
            self.cl.begin_task()
        self.cl.set_eval_adapter("preview")
        if self.adapter_only:
            self._patch_save(self.cl.model)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._unpatch_save(self.cl.model)
        self.cl.end_task()
        self.cl.set_eval_adapter("merged")
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.adapter_only and state.is_world_process_zero:
            self.cl.save(Path(args.output_dir) / f"checkpoint-{state.global_step}" / "slao")
        return control

    # -- the pieces -----------------------------------------------------------------------------------

    def _resume(self, checkpoint: Path) -> None:
        """Restore the SLAO state saved with the checkpoint the Trainer resumed from."""
        if not (checkpoint / "slao" / "continual.json").is_file():
            raise FileNotFoundError(
                f"{checkpoint}: resuming a task needs the SLAO state its checkpoint holds (slao/); "
                "resume with resume_from_checkpoint=True or a checkpoint-N folder of args.output_dir"
            )
        loaded = ContinualLoRA.load(self.cl.model, checkpoint / "slao", backend=self.cl.backend)
        self.cl.task_index, self.cl.in_task = loaded.task_index, loaded.in_task

    def _patch_save(self, model) -> None:
        if self._saved_save_pretrained is None:
            self._saved_save_pretrained = model.__dict__.get("save_pretrained")
            cl = self.cl

            def save_adapters(save_directory, *args, is_main_process: bool = True, **kwargs):
                if is_main_process:
                    _save_adapter_checkpoint(cl, Path(save_directory))

            model.save_pretrained = save_adapters  # this instance only, until on_train_end

    def _unpatch_save(self, model) -> None:
        if "save_pretrained" in model.__dict__:
            del model.save_pretrained
        if self._saved_save_pretrained is not None:
            model.save_pretrained = self._saved_save_pretrained
        self._saved_save_pretrained = None


def _save_adapter_checkpoint(cl: ContinualLoRA, folder: Path) -> None:
    """The LoRA tensors under their state_dict keys as a one-shard checkpoint the Trainer can resume.

    The Trainer's resume loads shards non-strictly, so the frozen base weights (absent) stay as they
    are; ``_keys_to_ignore_on_save`` would not help: the shard is the only file.
    """
    model = cl.model
    tensors = {k: v for k, v in model.state_dict().items() if _is_lora_key(k)}
    atomic_save_safetensors(tensors, folder / SHARD)
    index = {"metadata": {"format": "mbf-adapter-only"}, "weight_map": {k: SHARD for k in tensors}}
    atomic_write_text(json.dumps(index, indent=1), folder / INDEX)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        atomic_write_text(config.to_json_string(), folder / "config.json")


def _is_lora_key(key: str) -> bool:
    return key.rpartition(".")[2] in ("lora_A", "lora_B", "merged_A", "merged_B")

