"""A continual run: train a task sequence with one method, evaluate, and commit after every task.

The method is a continual strategy (``mbf.strategies``: SLAO's ``ContinualLoRA``, O-LoRA, ...); each
task runs through its hooks in ``mbf.strategies.loop.run_task``'s order. After each task every task seen
so far, and the next one (for forward transfer), is evaluated with the adapter inference uses (SLAO's
merged adapter) and the run directory is written, atomically, so that ``resume=True`` continues from the
last finished task and a crash loses at most the task in progress. Before the first task the bare model is
evaluated once on every task (the zero-shot reference of FWT; cached by model fingerprint and test set when
a cache folder is given)::

    OUT/results.json          the results (schema in mbf/experiment/results.py): the commit point
    OUT/results.md, accuracy.png   the same as a table and a heatmap
    OUT/checkpoints/task-NN   the strategy's save() after task NN (only the latest is kept)
    OUT/.mbf-lock             held (flock) while a process writes the run: one writer at a time
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mbf.checkpoint import bound_to_run
from mbf.config import LoRAConfig
from mbf.experiment import predictions, report, rundir
from mbf.experiment import results as results_file
from mbf.experiment.batches import Codec
from mbf.experiment.evaluate import headline, score_task, scorers_of
from mbf.experiment.methods import method_config, with_run_seed
from mbf.experiment.tasks import Task, check_tasks, tasks_fingerprint
from mbf.experiment.train import TrainOptions, run_inputs, train_steps
from mbf.experiment.zero_shot import weights_fingerprint, zero_shot_records
from mbf.inject import inject, lora_layers
from mbf.io import peak_rss
from mbf.strategies import ContinualStrategy, load_strategy, make_strategy
from mbf.strategies.base import ADAM_MOMENTS
from mbf.strategies.loop import run_task

__all__ = ["model_dtype", "run_continual", "run_settings"]


def model_dtype(model: nn.Module) -> str:
    """The base model's dtype as a name (its input embeddings': never quantised, never an adapter)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = emb.weight if emb is not None else next(p for p in model.parameters() if p.is_floating_point())
    return str(weight.dtype).removeprefix("torch.")


def _measure(train: Callable[[], dict], evaluate: Callable[[], dict]) -> dict:
    """Train, then evaluate, each timed: ``{"stats", "train_s", "evaluation", "eval_s"}``."""
    t0 = time.time()
    stats = train()
    t1 = time.time()
    evaluation = evaluate()
    return {"stats": stats, "train_s": t1 - t0, "evaluation": evaluation, "eval_s": time.time() - t1}


def run_settings(
    *,
    method: str,
    config: Any,
    tasks: list[Task],
    lora: LoRAConfig,
    opts: TrainOptions,
    meta: dict | None = None,
) -> dict:
    """results.json's settings of a run, all but those of the loaded model (``dtype``,
    ``model_fingerprint``): what ``--resume`` can check before a model is loaded."""
    return {
        "method": method,
        "options": None if config is None else with_run_seed(config, opts.seed).to_dict(),
        "seed": opts.seed,
        "tasks": [t.name for t in tasks],
        "lora": lora.to_dict(),
        "train": opts.to_dict(),
        **(meta or {}),
        "data_fingerprint": tasks_fingerprint(tasks),
    }


@dataclass
class _Run:
    """What every stage of one run shares."""

    model: nn.Module
    codec: Codec
    tasks: list[Task]
    opts: TrainOptions
    out: Path
    results: dict
    method: str
    log: Callable[[str], None]

    def evaluate(self, tasks: list[Task], after: str, adapter: str = "merged") -> list[dict]:
        """Every example of ``tasks`` scored by each scorer of the run, with the model as it is."""
        return [
            {**rec, "adapter": adapter}
            for t in tasks
            for rec in score_task(
                self.model, self.codec, t, self.opts, desc=f"eval {t.name} after {after}"
            ).values()
        ]

    def commit(
        self, task: str, measured: dict, *, adapter_bytes: int, checkpoint: str | None, optimizer_bytes: int,
        buffer_bytes: int | None = None,
    ) -> None:  # fmt: skip
        """Record the stage and write the run directory: its predictions first, then ``results.json``,
        the commit point."""
        records, finetuned = measured["evaluation"]
        stage = len(self.results["per_task"]) + 1
        predictions.write(self.out, stage, task, records, run=results_file.identity(self.results))
        merged = [r for r in records if r["adapter"] == "merged"]
        by_scorer = {
            s: [r["score"] for r in merged if r["scorer"] == s] for s in scorers_of(self.opts.scoring)
        }
        results_file.add_stage(
            self.results,
            task=task,
            stats=measured["stats"],
            train_s=measured["train_s"],
            eval_s=measured["eval_s"],
            accuracy=by_scorer[headline(self.opts.scoring)],
            by_scorer=by_scorer,
            finetuned=finetuned,
            adapter_bytes=adapter_bytes,
            optimizer_bytes=optimizer_bytes,
            buffer_bytes=buffer_bytes,
            peak_rss_mb=peak_rss() / 2**20,  # the process's peak so far (never reset here)
            checkpoint=checkpoint,
        )
        multi_task = checkpoint is None  # the multi-task baseline keeps no adapter: one stage, the last
        if multi_task or len(self.results["per_task"]) == len(self.tasks):
            results_file.finish(self.results, multi_task=multi_task)
        report.write_run(self.out, self.results)

    def continual_stage(self, cl: ContinualStrategy, i: int) -> None:
        """Train task ``i`` (0-based) with ``cl``'s boundaries; evaluate tasks ``0..i`` merged; commit."""
        task, seed = self.tasks[i], self.opts.seed * 1000 + i
        own = [(task, ex) for ex in task.train]
        seen = [[(t, ex) for ex in t.train] for t in self.tasks[:i]] + [own]
        # the task's own examples set the steps: replayed ones are mixed into its batches, not added as
        # extra steps, so every method trains the same steps per task
        opts = replace(self.opts, max_steps=self.opts.steps_for(len(own)))
        desc = f"train {i + 1}/{len(self.tasks)} {task.name}"
        evaluated = self.tasks[: i + 2]  # the next task too, untrained yet (FWT)
        if self.opts.offdiag_test and i < len(self.tasks) - 1:  # cells no metric reads: fewer examples
            n = self.opts.offdiag_test
            evaluated = [replace(t, test=t.test[:n]) if j < i else t for j, t in enumerate(evaluated)]
        checkpoint, tuned = f"checkpoints/task-{i + 1:02d}", f"{task.name} (fine-tuned)"

        def train(examples: list, params: list, loss_term, after_step) -> dict:
            return train_steps(self.model, params, self.codec, examples, opts, seed, desc,
                               after_step=after_step, loss_term=loss_term)  # fmt: skip

        def save() -> None:
            with bound_to_run(results_file.identity(self.results)):  # a resume refuses another run's
                cl.save(self.out / checkpoint)

        # set before begin_task (init="random" draws there): a resumed run equals an uninterrupted one
        torch.manual_seed(seed)
        done = run_task(
            cl, i, seen, train=train, save=save,
            forward=lambda: run_inputs(self.model, self.codec, own, self.opts),
            evaluate_merged=lambda: self.evaluate(evaluated, after=task.name),
            evaluate_finetuned=lambda: self.evaluate([task], after=tuned, adapter="finetuned"),
        )  # fmt: skip
        # the task's own adapter alone (plasticity, without the merge's dilution); the merged one where they
        # are the same (e.g. SLAO with λ ≡ 1)
        own_records = done.finetuned or [r for r in done.merged if r["task"] == task.name]
        own_score = next(r["score"] for r in own_records if r["scorer"] == headline(self.opts.scoring))
        measured = {"stats": done.stats, "train_s": done.train_s, "eval_s": done.eval_s,
                    "evaluation": (done.merged + (done.finetuned or []), own_score)}  # fmt: skip
        kept = done.memory.buffered  # replay's kept examples: their text is the buffer's memory
        self.commit(task.name, measured, adapter_bytes=done.memory.adapter_bytes, checkpoint=checkpoint,
                    optimizer_bytes=done.memory.optimizer_bytes, buffer_bytes=None if kept is None else
                    sum(len(ex.input.encode()) + len(ex.output.encode()) for _, ex in kept))  # fmt: skip
        # after the commit, which names the new one; never a folder this run did not make
        identity = results_file.identity(self.results)
        rundir.prune_checkpoints(self.out, keep=Path(checkpoint).name, run=identity)
        stats, row = measured["stats"], self.results["accuracy"][-1]
        nxt = f" (next {row[i + 1]:.2f})" if len(row) > i + 1 else ""
        self.log(
            f"[{self.method}] task {i + 1}/{len(self.tasks)} {task.name}: loss {stats['first_loss']:.3f}->"
            f"{stats['final_loss']:.3f}, acc {' '.join(f'{a:.2f}' for a in row[: i + 1])}{nxt} "
            f"(train {measured['train_s']:.0f}s, eval {measured['eval_s']:.0f}s)"
        )

    def multi_task_stage(self) -> None:
        """One LoRA on every task's data at once, as many steps as the whole sequence; evaluated once."""
        mixed = [(t, ex) for t in self.tasks for ex in t.train]
        cap = (self.opts.max_steps or 0) * len(self.tasks) or None
        opts = replace(self.opts, max_steps=cap)
        params = [p for p in self.model.parameters() if p.requires_grad]

        def train() -> dict:
            torch.manual_seed(self.opts.seed)
            return train_steps(
                self.model, params, self.codec, mixed, opts, self.opts.seed, "train multi-task"
            )

        measured = _measure(train, lambda: (self.evaluate(self.tasks, after="multi-task"), None))
        adapters = [t for m in lora_layers(self.model).values() for t in (m.lora_A, m.lora_B)]
        adapter_bytes = sum(t.numel() * t.element_size() for t in adapters)
        optimizer_bytes = ADAM_MOMENTS * adapter_bytes  # every adapter trains
        self.commit(
            "all", measured, adapter_bytes=adapter_bytes, checkpoint=None, optimizer_bytes=optimizer_bytes
        )


def run_continual(
    model: nn.Module,
    codec: Codec,
    tasks: list[Task],
    out: str | Path,
    *,
    method: str = "slao",
    config: Any = "preset",
    lora: LoRAConfig | None = None,
    opts: TrainOptions | None = None,
    resume: bool = False,
    meta: dict | None = None,
    log: Callable[[str], None] = print,
    zero_shot_cache: Path | None = None,
    accept_changes: bool = False,
) -> dict:
    """Train ``tasks`` in order with ``method``; write ``out/results.json`` after every task.

    Args:
        model: a causal LM without LoRA layers (``model.model`` the decoder, ``model.lm_head``).
        codec: its tokenizer as a ``Codec``.
        tasks: the task sequence.
        out: the run directory.
        method: the method's name (results.json's ``method``; one of ``METHODS``).
        config: its strategy config, as ``method_config`` makes it with any overrides (None: the
            multi-task baseline); ``"preset"``: ``METHODS[method]`` as it is.
        lora: the adapter configuration (default ``LoRAConfig()``: r 8, q_proj and v_proj).
        opts: training options (seeds per task derive from ``opts.seed``).
        resume: continue the run in ``out`` from its last finished task.
        meta: extra fields for results.json (suite, model name...).
        log: receives one line per finished task.
        zero_shot_cache: a folder where the bare model's scores are kept between runs (None: none).
        accept_changes: on resume, continue with settings that differ from the saved run's and record
            the differences in results.json (``resumed_with_changes``) instead of refusing.

    Returns:
        The results dict (also in ``out/results.json``).

    Raises:
        FileExistsError: when ``out`` holds a run and ``resume`` is False, or files but no run;
            ``rundir.RunLocked`` when another process is writing it.
        ValueError: on an unknown method or override, a task without examples; on resume, when any
            setting differs from the saved run's (each listed as ``name: saved -> given``).
    """
    out, lora, opts = Path(out), lora or LoRAConfig(), opts or TrainOptions()
    check_tasks(tasks)
    if config == "preset":
        config = method_config(method)
    config = with_run_seed(config, opts.seed)  # a strategy that draws (replay's buffer) replicates by seed
    if opts.prompt_format != codec.prompt_format:
        raise ValueError(
            f"opts.prompt_format {opts.prompt_format!r}, but the codec writes {codec.prompt_format} prompts"
        )
    settings = {
        **run_settings(method=method, config=config, tasks=tasks, lora=lora, opts=opts, meta=meta),
        "dtype": model_dtype(model),
        "model_fingerprint": weights_fingerprint(model, legacy=resume and rundir.legacy_fingerprint(out)),
    }
    rundir.check_out(out, resume)  # before the lock creates the directory or its lock file
    with rundir.lock(out):
        rundir.check_out(out, resume)  # again, now that no other process can write it
        saved = rundir.check_resume(out, settings, accept_changes) if resume else None
        results = saved or results_file.new(settings)
        run = _Run(model, codec, tasks, opts, out, results, method, log)
        done = len(results["per_task"])
        if results.get("zero_shot") is None:  # before inject: the bare model, the reference of FWT
            records = zero_shot_records(model, codec, tasks, opts, cache=zero_shot_cache, log=log)
            predictions.write(out, 0, "zero-shot", records, run=results_file.identity(results))
            by = {
                s: [round(r["score"], 4) for r in records if r["scorer"] == s]
                for s in scorers_of(opts.scoring)
            }
            results.update(
                zero_shot=by[headline(opts.scoring)], zero_shot_by_scorer=by, predictions=predictions.FOLDER
            )
        torch.manual_seed(opts.seed)
        inject(model, lora)
        if config is None:
            if not done:
                run.multi_task_stage()
            return results
        if done:  # with the method given (an --accept-changes resume applies the change)
            if not (out / results["checkpoint"]).is_dir():
                raise FileNotFoundError(
                    f"{out}: results.json records {done} finished tasks, but their adapter state "
                    f"{results['checkpoint']} is missing (was the run copied without its checkpoints/?): "
                    "it cannot resume; restore that folder, or run again in a new --out"
                )
            # this run's, between two tasks; then its tensors and fields, checked as the strategy loads it
            cl = load_strategy(model, rundir.check_checkpoint(out, results), config=config)
            if cl.task_index != done:
                raise ValueError(f"{out / results['checkpoint']} holds {cl.task_index} finished tasks, "
                                 f"results.json records {done}: the run's files disagree")  # fmt: skip
            log(f"resuming {out} after task {done}/{len(tasks)} ({tasks[done - 1].name})")
        else:
            cl = make_strategy(model, config)
        for i in range(done, len(tasks)):
            run.continual_stage(cl, i)
        return results
