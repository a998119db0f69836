"""reports/paired_table.py: the README's paired table from compare.json (hand-made comparisons)."""

import importlib.util
import json
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).parents[1] / "reports" / "paired_table.py"
_spec = importlib.util.spec_from_file_location("paired_table", _SCRIPT)
paired_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paired_table)


def _iv(est, low, high):
    return {"estimate": est, "low": low, "high": high, "level": 0.95, "significant": low > 0 or high < 0}


def _compare(baseline="seq-lora"):
    runs = {
        "seq-lora": ["r/std1-seq-lora-s0", "r/std1-seq-lora-s1", "r/std1-seq-lora-s2", "r/std3-seq-lora-s0"],
        "slao": ["r/std1-slao-s0", "r/std1-slao-s2", "r/std3-slao-s0"],
        "multi-task": ["r/std1-multi-task-s0"],
    }
    row = {"units": 4, "AA": _iv(0.5, 0.45, 0.55), "BWT": _iv(-0.1, -0.2, -0.05), "FWT": _iv(0.1, 0.0, 0.2),
           "LA": _iv(0.6, 0.55, 0.65), "tasks": {}}  # fmt: skip
    mt = {"units": 1, "AA": _iv(0.64625, 0.6, 0.7), "BWT": None, "FWT": None, "LA": None, "tasks": {}}
    diff = {"units": 3, "AA": _iv(0.025, 0.007, 0.041), "BWT": _iv(0.05, 0.02, 0.08),
            "FWT": _iv(-0.005, -0.03, 0.02), "LA": _iv(-0.018, -0.035, -0.0002), "tasks": {}}  # fmt: skip
    return {
        "methods": {m: {"runs": r} for m, r in runs.items()},
        "intervals": {"baseline": baseline,
                      "methods": {"seq-lora": row, "slao": {**row, "units": 3}, "multi-task": mt},
                      "vs_baseline": {"slao": diff, "multi-task": {**mt, "AA": _iv(0.16, 0.1, 0.2)}}},
    }  # fmt: skip


def test_rows_units_and_significance():
    lines = paired_table.table(_compare()).splitlines()
    assert lines[0] == "| | units | AA | BWT | FWT | LA |"
    assert lines[2].startswith("| seq-lora | 4 (std1 0–2; std3 0) | 50.0 [45.0, 55.0] | −10.0 [−20.0, −5.0]")
    assert lines[3].startswith("| slao | 3 (std1 0, 2; std3 0) |")  # seed 1 missing: not a span
    assert lines[4] == "| multi-task | 1 (std1 0) | 64.6 [60.0, 70.0] | – | – | – |"
    # the difference over the units both have; bold where the interval leaves 0, n.s. where it crosses it
    assert lines[5] == (
        "| slao − seq-lora | 3 (std1 0, 2; std3 0) | **+2.5 [+0.7, +4.1]** | **+5.0 [+2.0, +8.0]** "
        "| −0.5 [−3.0, +2.0] n.s. | **−1.8 [−3.5, −0.0]** |"
    )
    assert len(lines) == 6  # multi-task − seq-lora (AA only) gets no row


def test_extra_rows_only_for_the_methods_asked():
    other = _compare("multi-task")
    one_unit = {**other["intervals"]["vs_baseline"]["slao"], "units": 1}  # multi-task has std1 seed 0 only
    other["intervals"]["vs_baseline"] = {"slao": one_unit, "seq-lora": one_unit}
    lines = paired_table.table(_compare(), [(other, {"slao"})]).splitlines()
    assert lines[-1].startswith("| slao − multi-task | 1 (std1 0) |")
    assert not any(line.startswith("| seq-lora − multi-task") for line in lines)


def test_extra_names_a_method_without_its_settings_label_and_refuses_one_it_lacks():
    # mbf compare labels methods whose runs differ in settings ("o-lora [lr=0.001]"); naming "o-lora"
    # must pick that row, and a name with no row is an error, not a silently empty section
    other = _compare("multi-task")
    one_unit = {**other["intervals"]["vs_baseline"]["slao"], "units": 1}
    other["intervals"]["vs_baseline"] = {"slao [lr=0.001]": one_unit, "seq-lora [lr=0.0003]": one_unit}
    other["methods"]["slao [lr=0.001]"] = other["methods"]["slao"]
    lines = paired_table.table(_compare(), [(other, {"slao"})]).splitlines()
    assert lines[-1].startswith("| slao [lr=0.001] − multi-task | 1 (std1 0) |")
    assert not any(line.startswith("| seq-lora") and "multi-task" in line for line in lines)
    with pytest.raises(ValueError, match=r"no difference for \['o-lora'\]"):
        paired_table.table(_compare(), [(other, {"o-lora"})])


def test_each_extra_keeps_the_methods_named_after_it(tmp_path):
    # --extra DIR [METHOD ...], repeatable: one comparison's rows for its own methods, another's for all
    diff = _compare()["intervals"]["vs_baseline"]["slao"]  # 3 units
    one_unit = {**diff, "units": 1}  # against multi-task: std1 seed 0 only
    for name, baseline, rows in (("a", "multi-task", {"slao": one_unit, "seq-lora": one_unit}),
                                 ("b", "slao", {"seq-lora": diff})):  # fmt: skip
        cmp = _compare(baseline)
        cmp["intervals"]["vs_baseline"] = rows
        (tmp_path / name).mkdir()
        (tmp_path / name / "compare.json").write_text(json.dumps(cmp))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "compare.json").write_text(json.dumps(_compare()))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- paired:start -->\n<!-- paired:end -->\n")
    argv = [str(tmp_path / "c"), "--extra", str(tmp_path / "a"), "slao", "--extra", str(tmp_path / "b")]
    assert paired_table.main([*argv, "--readme", str(readme)]) == 0
    rows = [line.split(" | ")[0] for line in readme.read_text().splitlines() if " − " in line]
    assert rows == ["| slao − seq-lora", "| slao − multi-task", "| seq-lora − slao"]


def test_readme_markers(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "compare.json").write_text(json.dumps(_compare()))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- paired:start -->\nold\n<!-- paired:end -->\nafter\n")
    assert paired_table.main([str(tmp_path / "c"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n<!-- paired:start -->\n| | units |")
    assert text.endswith("<!-- paired:end -->\nafter\n")
    assert "old" not in text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="needs one <!-- paired:start -->"):
        paired_table.main([str(tmp_path / "c"), "--readme", str(readme)])


def test_a_run_not_named_by_the_sweep_is_refused():
    bad = _compare()
    bad["methods"]["slao"]["runs"] = ["r/my-run"]
    with pytest.raises(ValueError, match="my-run: not named ORDER-METHOD-sSEED"):
        paired_table.table(bad)


def test_significance_is_the_comparisons_own_flag():
    cmp = _compare()
    cmp["intervals"]["vs_baseline"]["slao"]["AA"]["significant"] = False  # e.g. another level's verdict
    assert "| +2.5 [+0.7, +4.1] n.s. |" in paired_table.table(cmp)


def test_a_units_count_that_disagrees_with_the_interval_is_refused():
    cmp = _compare()
    cmp["intervals"]["vs_baseline"]["slao"]["units"] = 2  # compare paired fewer runs than the names say
    with pytest.raises(ValueError, match="slao: the interval is over 2 units, run names give 3"):
        paired_table.table(cmp)


@pytest.mark.parametrize(
    "seeds, label", [([0, 1], "2 (std1 0–1)"), ([0, 2, 3], "3 (std1 0, 2–3)"), ([5], "1 (std1 5)")]
)
def test_units_label_spans(seeds, label):
    assert paired_table.units_label({("std1", s) for s in seeds}) == label


@pytest.mark.parametrize(
    "text",
    ["<!-- paired:end -->\n<!-- paired:start -->\n", "<!-- paired:start -->\n" * 2 + "<!-- paired:end -->"],
)
def test_markers_out_of_order_or_twice_are_refused(text):
    with pytest.raises(ValueError, match="needs one"):
        paired_table.replace_between(text, "body")


def test_memory_column_gives_each_methods_adapter_after_the_last_task_and_replays_buffer(tmp_path):
    cmp = _compare()
    kib = 1024
    cmp["methods"]["seq-lora"]["memory"] = {"adapter_bytes": [[3600 * kib] * 4] * 4,
                                            "buffer_bytes": [[None] * 4] * 4}  # fmt: skip
    cmp["methods"]["slao"]["memory"] = {  # runs that differ (as InfLoRA's kept bases): the span; a buffer
        "adapter_bytes": [[1, 43470 * kib], [1, 43497 * kib], [1, 43470 * kib]],
        "buffer_bytes": [[3 * kib, 17 * kib]] * 3,
    }
    lines = paired_table.table(cmp, memory=True).splitlines()
    assert lines[0] == "| | units | AA | BWT | FWT | LA | adapter KiB after T tasks |"
    assert lines[2].endswith(" | 3,600 |")
    assert lines[3].endswith(" | 43,470–43,497 + 17 buffer |")
    assert lines[4].endswith(" | – |")  # no memory recorded
    assert lines[5].endswith(" n.s. | **−1.8 [−3.5, −0.0]** | – |")
    assert all(line.count("|") == 8 for line in lines)  # 7 columns
    readme = tmp_path / "README.md"  # a second table in the same file, between its own markers
    readme.write_text(
        "<!-- paired:start -->\nkept\n<!-- paired:end -->\n<!-- methods:start -->\n<!-- methods:end -->\n"
    )
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "compare.json").write_text(json.dumps(cmp))
    argv = [str(tmp_path / "c"), "--memory", "--readme", str(readme), "--marker", "methods"]
    assert paired_table.main(argv) == 0
    text = readme.read_text()
    assert "kept" in text and text.index("<!-- methods:start -->\n| | units |") > text.index("kept")
