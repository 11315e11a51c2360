"""``bioprop reproduce`` and ``bioprop report`` on bad input and on run directories that are not what the file
says: each is refused in one line naming what was wrong and what is allowed (exit 2), never a traceback, and a
finished run made with other settings never enters a table as the cell's run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bioprop.cli import main
from bioprop.experiments import ExperimentError, collect, reproduce
from test_reproduce import TINY, quiet, tiny_file


def error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    return lines[0]


@pytest.fixture()
def finished(tmp_path: Path) -> tuple[Path, Path]:
    """The tiny table's digits/bp cell run at smoke scale (seed 0): (experiment file, output dir)."""
    path = tiny_file(tmp_path)
    out = tmp_path / "out"
    reproduce(path, "smoke", only="digits/bp", output_dir=out, report=False, verbose=False, log=quiet)
    return path, out


def argv(path: Path, out: Path, *extra: str) -> list[str]:
    return ["reproduce", str(path), "--scale", "smoke", "--only", "digits/bp", "--output-dir", str(out),
            "--no-report", "--no-progress", *extra]


# ------------------------------------------------------------------------------------------ stale runs


@pytest.mark.parametrize("old, new, difference", [
    ("lr = 0.05", "lr = 0.01", "lr: run 0.05, file 0.01"),  # lower: allowed on resume, not for a finished run
    ("lr = 0.05", "lr = 0.5", "lr: run 0.05, file 0.5"),
    ("[scales.smoke]\nepochs = 1", "[scales.smoke]\nepochs = 2", "epochs: run 1, file 2"),
])
def test_a_finished_run_made_with_other_settings_is_refused_by_every_mode(
        finished: tuple[Path, Path], old: str, new: str, difference: str, capsys: pytest.CaptureFixture) -> None:
    path, out = finished
    path.write_text(TINY.replace(old, new, 1))
    run = out / "smoke" / "digits" / "bp" / "s0"
    for mode in ((), ("--collect",)):
        assert main(argv(path, out, *mode)) == 2
        line = error_line(capsys)
        assert f"cell digits/bp seed 0: {run} was made with other settings than tiny.toml gives ({difference})" \
            in line and "delete it to run the cell again" in line
    assert main(argv(path, out, "--dry-run")) == 0
    assert f"s0: refuse (made with other settings: {difference}) -> {run}" in capsys.readouterr().out
    with pytest.raises(ExperimentError, match="other settings"):
        collect(path, "smoke", output_dir=out, report=False)  # a cell outside --only is checked as well


def test_a_diverged_run_made_with_another_lr_is_refused_and_printing_options_do_not_count(
        finished: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    path, out = finished
    run = out / "smoke" / "digits" / "bp" / "s0"
    config = json.loads((run / "config.json").read_text())
    config.update(verbose=True, progress=True, output_dir="elsewhere/s0", num_workers=3)  # not what it trained
    (run / "config.json").write_text(json.dumps(config))
    assert main(argv(path, out)) == 0  # still the cell's run: skipped
    assert "nothing to train" in capsys.readouterr().out
    (run / "final.json").rename(run / "diverged.json")
    (run / "diverged.json").write_text(json.dumps({"message": "training diverged in epoch 1"}))
    path.write_text(TINY.replace("lr = 0.05", "lr = 0.02", 1))
    assert main(argv(path, out)) == 2
    assert "(lr: run 0.05, file 0.02)" in error_line(capsys)


# ------------------------------------------------------------------------------------------ damaged records


@pytest.mark.parametrize("name, text, reason", [
    ("final.json", '{"final_test_error": ', "not valid JSON"),
    ("final.json", "[1, 2]", "a JSON list, not an object"),
    ("final.json", '{"final_test_error": "low"}', "final_test_error is 'low', not a finite number"),
    ("final.json", '{"final_test_error": true}', "final_test_error is True, not a finite number"),
    ("config.json", "[]", "a JSON list, not an object"),
    ("config.json", "\xff\xfe", "not valid JSON"),
])
def test_a_damaged_record_is_named_in_one_line(finished: tuple[Path, Path], name: str, text: str, reason: str,
                                               capsys: pytest.CaptureFixture) -> None:
    path, out = finished
    run = out / "smoke" / "digits" / "bp" / "s0"
    (run / name).write_bytes(text.encode("latin-1"))
    for mode in ((), ("--collect",)):
        assert main(argv(path, out, *mode)) == 2
        line = error_line(capsys)
        assert f"{run / name} is damaged (" in line and reason in line and f"delete {run}" in line


def test_a_run_that_never_evaluated_is_done_without_a_value(finished: tuple[Path, Path]) -> None:
    path, out = finished
    final = out / "smoke" / "digits" / "bp" / "s0" / "final.json"
    final.write_text(json.dumps({**json.loads(final.read_text()), "final_test_error": None}))
    table = collect(path, "smoke", only="digits/bp", output_dir=out, report=False)
    (cell,) = [c for c in table["cells"] if c["id"] == "digits/bp"]
    assert cell["status"] == "done" and cell["mean"] is None and cell["seeds_done"] == 0
    assert cell["reason"] == "seed 0: no test value recorded (never evaluated)"


# ------------------------------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize("extra, message", [
    (["--only", ""], "--only '' holds an empty pattern; allowed: comma-separated patterns on COLUMN/ROW with "
                     "columns digits, wide and rows bp, fa, future"),
    (["--only", "digits/bp,digts/fa"], "--only: 'digts/fa' matches no cell of tiny; allowed:"),
    (["--seeds", "0"], "--seeds must be an integer from 1 to 100, got 0"),
    (["--seeds", "100000"], "--seeds must be an integer from 1 to 100, got 100000"),
    (["--output-dir", ""], "--output-dir is empty; allowed: a directory path"),
    (["--output-dir", "a\nb", "--print-commands"], "--output-dir 'a\\nb' holds a control character"),
    (["--output-dir", "{file}", "--print-commands"], "output_dir {file} is a file; allowed: a directory"),
    (["--output-dir", "{file}", "--collect"], "output_dir {file} is a file; allowed: a directory"),
    (["--output-dir", "{file}", "--dry-run"], "output_dir {file} is a file; allowed: a directory"),
    (["--output-dir", "{file}/under"], "lies under {file}, which is a file"),
    (["--output-dir", "x" * 300, "--dry-run"], "is not a valid path here: File name too long"),
    (["--output-dir", "{tmp}/nothing", "--collect"], "nothing to collect: {tmp}/nothing/smoke holds no run "
                                                     "directory; run 'bioprop reproduce tiny --scale smoke' first"),
])
def test_bad_arguments_are_refused_in_one_line(tmp_path: Path, extra: list[str], message: str,
                                               capsys: pytest.CaptureFixture) -> None:
    path = tiny_file(tmp_path)
    (tmp_path / "afile").write_text("")
    fill = {"file": str(tmp_path / "afile"), "tmp": str(tmp_path)}
    extra = [e.format(**fill) for e in extra]
    assert main(["reproduce", str(path), "--scale", "smoke", *extra]) == 2
    assert message.format(**fill) in error_line(capsys)
    assert not (tmp_path / "nothing").exists()  # --collect made nothing


def test_an_experiment_path_that_is_a_directory_or_not_utf8_is_refused(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    assert main(["reproduce", f"{tmp_path}/", "--list"]) == 2
    assert f"{tmp_path} is a directory; allowed: an experiment name (akrout2019, " in error_line(capsys)
    (tmp_path / "latin.toml").write_bytes(TINY.replace("8x8", "8\xd78").encode("latin-1"))
    assert main(["reproduce", str(tmp_path / "latin.toml"), "--list"]) == 2
    assert "latin.toml: not UTF-8 text (byte " in error_line(capsys)


# ------------------------------------------------------------------------------------------ bioprop report


@pytest.mark.parametrize("extra, message", [
    (["--output-dir", ""], "--output-dir is empty; allowed: a directory path"),
    (["--output-dir", "{file}"], "output_dir {file} is a file; allowed: a directory"),
    (["--tsne-dataset", "mnist"], "--tsne-dataset needs --tsne"),
    (["--tsne", "--tsne-dataset", "mnsit"], "--tsne-dataset 'mnsit' is not a data set; allowed: "),
])
def test_report_refuses_bad_arguments_in_one_line(finished: tuple[Path, Path], extra: list[str], message: str,
                                                  capsys: pytest.CaptureFixture) -> None:
    path, out = finished
    (path.parent / "afile").write_text("")
    fill = {"file": str(path.parent / "afile")}
    run = out / "smoke" / "digits" / "bp" / "s0"
    assert main(["report", str(run), *[e.format(**fill) for e in extra]]) == 2
    assert message.format(**fill) in error_line(capsys)


def test_report_warns_on_a_damaged_record(finished: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    path, out = finished
    run = out / "smoke" / "digits" / "bp" / "s0"
    (run / "final.json").write_text("[]")
    assert main(["report", str(run), "--output-dir", str(path.parent / "report")]) == 0
    err = capsys.readouterr().err
    assert f"warning: {run}: final.json does not hold a JSON object" in err
    assert (path.parent / "report" / "report.html").is_file()
