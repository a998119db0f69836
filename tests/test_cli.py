"""The ``mbf`` command: argument errors, and continual / compare / eval on a tiny local Llama checkpoint."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fixtures.tiny import tiny_llama  # noqa: E402

from mbf.cli import build_parser, main  # noqa: E402


@pytest.mark.parametrize(
    "argv, message",
    [
        (["continual", "--method", "slao"], "--out"),
        (["continual", "--out", "x", "--method", "lora"], "invalid choice: 'lora'"),
        (["continual", "--out", "x", "--schedule", "cubic"], "invalid choice: 'cubic'"),
        (["continual", "--out", "x", "--lr", "-1"], "must be > 0"),
        (["continual", "--out", "x", "--batch-size", "0"], "must be a positive integer"),
        (["continual", "--out", "x", "--max-steps", "-3"], "must be >= 0"),
        (["continual", "--out", "x", "--suite", "glue"], "invalid choice: 'glue'"),
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
    assert (
        main(["continual", "--out", str(tmp_path / "a"), "--method", "multi-task", "--init", "random"]) == 2
    )
    assert "multi-task" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--data-dir"):
        main(["continual", "--out", str(tmp_path / "a"), "--suite", "olora"])
    assert main(["continual", "--out", str(tmp_path / "a"), "--model", str(tmp_path / "missing")]) == 2
    assert "not a Hugging Face checkpoint" in capsys.readouterr().err
    assert (
        main(
            [
                "continual",
                "--out",
                str(tmp_path / "a"),
                "--suite",
                "olora",
                "--data-dir",
                str(Path(__file__).parent / "fixtures" / "cl_benchmark"),
                "--order",
                "O7",
            ]
        )
        == 2
    )
    assert "unknown order 'O7'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Llama saved with a tiny word-level tokenizer: a local checkpoint like any other."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from mbf.tasks import ANIMALS, COLORS, FRUITS, OBJECTS

    words = [
        "<pad>",
        "</s>",
        "Which",
        "word",
        "is",
        "a",
        "an",
        "comes",
        "first?",
        "last?",
        "color?",
        "animal?",
        "fruit?",
        "Input:",
        "Answer:",
        "[UNK]",
        *ANIMALS,
        *COLORS,
        *FRUITS,
        *OBJECTS,
    ]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="[UNK]")
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama()
    cfg = model.config.to_dict()
    cfg.update(vocab_size=len(words), pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k in LlamaConfig().to_dict()}))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_continual_resume_compare_eval(tiny_checkpoint, tmp_path, capsys):
    common = [
        "--model",
        str(tiny_checkpoint),
        "--n-train",
        "8",
        "--n-test",
        "4",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--eval-batch-size",
        "4",
        "--r",
        "2",
        "--alpha",
        "4",
    ]
    run = tmp_path / "slao"
    assert main(["continual", "--method", "slao", "--out", str(run), *common]) == 0
    out = capsys.readouterr().out
    assert "AA" in out and str(run / "results.md") in out
    res = json.loads((run / "results.json").read_text())
    assert res["complete"] and res["lora"]["r"] == 2 and res["model"] == str(tiny_checkpoint)
    # the same --out again needs --resume; resuming a complete run changes nothing
    with pytest.raises(SystemExit, match="--resume"):
        main(["continual", "--method", "slao", "--out", str(run), *common])
    assert main(["continual", "--method", "slao", "--out", str(run), "--resume", *common]) == 0
    assert json.loads((run / "results.json").read_text())["accuracy"] == res["accuracy"]
    # an ablation by override, then the comparison
    abl = tmp_path / "abl"
    assert main(["continual", "--method", "slao", "--schedule", "inverse", "--out", str(abl), *common]) == 0
    assert json.loads((abl / "results.json").read_text())["options"]["schedule"] == "inverse"
    assert main(["compare", str(run), str(abl), "--out", str(tmp_path / "cmp")]) == 0
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| slao |" in text and "| slao (orthogonal, inverse) |" in text
    assert (tmp_path / "cmp" / "compare.png").is_file()
    capsys.readouterr()
    assert main(["eval", "--run", str(run)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[0] == "color" and lines[-1].startswith("        mean")


def test_demo_runs_both_methods_and_compares(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        main(
            ["demo", "--model", str(tiny_checkpoint), "--out", str(out), "--n-test", "4", "--max-steps", "2"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"report: {out / 'compare' / 'compare.md'}" in printed
    text = (out / "compare" / "compare.md").read_text()
    assert "| seq-lora | 0 |" in text and "| slao | 0 |" in text
    with pytest.raises(SystemExit, match="--resume"):
        main(["demo", "--model", str(tiny_checkpoint), "--out", str(out)])


def test_load_in_4bit_trains_on_an_nf4_base(tiny_checkpoint, tmp_path, capsys):
    """QLoRA through the command: every projection of the base is NF4, the run completes and resumes."""
    run = tmp_path / "q"
    args = [
        "continual",
        "--out",
        str(run),
        "--model",
        str(tiny_checkpoint),
        "--load-in-4bit",
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
    assert main(args) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["complete"] and res["lora"]["quantize"] == "nf4"
    capsys.readouterr()
    assert main(["eval", "--run", str(run)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].split()[0] == "mean"
