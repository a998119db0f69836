"""What the ``mbf`` subcommands share (``mbf.cli.commands``, ``mbf.cli.demo``): the suite, the preset
with the flags on top, and the model, loaded as the flags say."""

from __future__ import annotations

import os
import sys
import time
import warnings

from mbf.cli.parser import DEFAULT_MODEL


def _tasks(args) -> tuple[list, dict]:
    """``load_suite`` of the suite arguments (it checks their combinations). The suite seed follows
    ``--seed`` unless ``--suite-seed`` pins it: seeds then replicate the experiment, data included."""
    from mbf.experiment.suites import load_suite

    suite_seed = args.suite_seed if args.suite_seed is not None else getattr(args, "seed", 0)
    return load_suite(
        args.suite,
        n_train=args.n_train,
        n_test=args.n_test,
        suite_seed=suite_seed,
        data_dir=args.data_dir,
        order=args.order,
        split=getattr(args, "eval_split", None) or "test",
    )


def _load(args, qlora: object = None, *, prompt_format: str = "plain"):
    """``(model, Codec)``; with ``qlora`` (True, or the LoRAConfig to inject), a QLoRA base: every
    projection in NF4 but the config's targets, which inject quantises itself. ``prompt_format``
    ``"chat"``: the codec writes prompts inside the tokenizer's chat template."""
    import torch
    from safetensors import SafetensorError

    from mbf.experiment.batches import Codec
    from mbf.experiment.cpu_dtype import report_to
    from mbf.experiment.models import SlowDtypeWarning, load_model, quantize_base

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    measured: list[str] = []  # --dtype auto's line when it measured now: printed once the model loaded
    with warnings.catch_warnings(record=True) as caught, report_to(measured.append):
        warnings.simplefilter("always", SlowDtypeWarning)
        try:
            model, tok = load_model(args.model, dtype=args.dtype)
        except SafetensorError as err:  # a damaged download: the message alone would not say which file
            raise ValueError(f"--model {args.model}: its weights cannot be read ({err})") from err
    for line in measured:
        print(line, file=sys.stderr)
    for w in caught:  # the slow-dtype warning as one line; anything else as Python shows it
        if issubclass(w.category, SlowDtypeWarning):
            print(f"mbf: warning: --dtype {args.dtype}: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    name = args.model or f"{DEFAULT_MODEL} (embedded)"
    dtype = str(model.dtype).removeprefix("torch.")
    asked = "auto: " + args.dtype_note if getattr(args, "dtype_note", None) else args.dtype
    print(f"model {name} loaded in {time.time() - t0:.1f} s ({dtype}, --dtype {asked})", file=sys.stderr)
    if qlora:
        lora = None if qlora is True else qlora
        n = quantize_base(model, lora)
        later = " (+ the LoRA targets at inject)" if lora is not None else ""
        print(f"QLoRA base: {n} linears quantised to NF4{later}", file=sys.stderr)
    return model, Codec.from_tokenizer(tok, chat=prompt_format == "chat")


# the flag of each LoRAConfig field, to name it in LoRAConfig's own range errors
_LORA_FLAGS = {"r": "--r", "alpha": "--alpha", "dropout": "--lora-dropout",
               "target_modules": "--target-modules"}  # fmt: skip


def _preset(args, tasks: list | None = None):
    """The ``Preset`` of ``--preset`` with the training and LoRA flags given on top, built once: its
    ``train`` and ``lora`` go to the run as they are.

    Raises:
        ValueError: a flag's value that TrainOptions or LoRAConfig refuses, naming the flag.
    """
    from mbf.experiment.presets import preset

    generation = bool(tasks) and all(t.metric == "rougeL" for t in tasks)
    targets = getattr(args, "target_modules", None)
    if targets is not None and targets != "all-linear":
        targets = tuple(targets.split(","))
    max_steps = getattr(args, "max_steps", None)
    given = {name: getattr(args, name, None) for name in _TRAIN_FLAGS}
    if given["prompt_format"] == "auto":
        from mbf.experiment.models import has_chat_template

        given["prompt_format"] = "chat" if has_chat_template(args.model) else "plain"
    try:
        return preset(getattr(args, "preset", "quick"), generation).with_values(
            **given,
            max_steps=None if max_steps is None else (max_steps or None),  # 0: no cap
            seed=getattr(args, "seed", None),
            r=getattr(args, "r", None),
            alpha=getattr(args, "alpha", None),
            dropout=getattr(args, "lora_dropout", None),
            target_modules=targets,
            quantize="nf4" if getattr(args, "load_in_4bit", False) else None,
        )
    except ValueError as err:
        field = str(err).removeprefix("LoRAConfig: ").split(" ")[0]
        raise ValueError(f"{_LORA_FLAGS[field]}: {err}" if field in _LORA_FLAGS else str(err)) from err


# flags named as TrainOptions' fields (--max-steps is translated: 0 means no cap)
_TRAIN_FLAGS = ("lr", "epochs", "batch_size", "grad_accum", "warmup_steps", "weight_decay", "eval_batch_size",
                "max_length", "scoring", "prompt_format", "offdiag_test")  # fmt: skip


def _qlora(lora):
    """``_load``'s QLoRA argument for ``lora``: the config when it quantises, else None."""
    return lora if lora.quantize else None


def _model_name(args) -> str:
    """results.json's ``model``: the checkpoint's absolute path (a run is resumed or re-evaluated from
    anywhere), or the embedded model's name."""
    return os.path.abspath(args.model) if args.model else DEFAULT_MODEL


def _options(given: list[str] | None) -> dict[str, str]:
    """``--option NAME=VALUE`` flags as ``{NAME: VALUE}`` (text: the method's config converts it)."""
    out = {}
    for item in given or []:
        name, sep, value = item.partition("=")
        if not (sep and name.strip()):
            raise ValueError(f"--option {item}: expected NAME=VALUE")
        out[name.strip()] = value.strip()
    return out
