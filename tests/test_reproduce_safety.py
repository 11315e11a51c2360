"""``bioprop reproduce`` and ``bioprop report`` on bad input and on run directories that are not what the file
says: each is refused in one line naming what was wrong and what is allowed (exit 2), never a traceback, and a
finished run made with other settings never enters a table as the cell's run."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from bioprop.cli import main
from bioprop.engine.checkpoint import RunWarning
from bioprop.experiments import ExperimentError, collect, load_experiment, reproduce
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


@pytest.mark.parametrize("damage_checkpoint", [False, True])
def test_an_interrupted_run_made_with_other_settings_is_refused_before_it_resumes(
        tmp_path: Path, capsys: pytest.CaptureFixture, damage_checkpoint: bool) -> None:
    from bioprop.experiments import execute, make_plan

    path = tiny_file(tmp_path)
    out = tmp_path / "out"

    class Killed(Exception):
        pass

    def kill(info: object) -> None:
        if getattr(info, "step") == 6:  # mid-epoch 2 of digits/bp (4 steps per epoch): epoch 1's checkpoint stays
            raise Killed

    with pytest.raises(Killed):
        execute(make_plan(load_experiment(path), "quick", 1, "digits/bp", out), verbose=False, on_step=kill,
                log=lambda _: None)
    run = out / "quick" / "digits" / "bp" / "s0"
    if damage_checkpoint:  # unreadable: the settings are read from config.json instead
        (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    before = (run / "checkpoint.pt").read_bytes()
    path.write_text(TINY.replace("lr = 0.05", "lr = 0.01", 1))  # a lower lr: the engine itself would resume
    quick = ["reproduce", str(path), "--scale", "quick", "--only", "digits/bp", "--output-dir", str(out),
             "--no-report", "--no-progress"]
    assert main(quick) == 2
    line = error_line(capsys)
    assert (f"cell digits/bp seed 0: {run} holds an interrupted run (resuming it would mix two settings in one "
            "run) made with other settings than tiny.toml gives (lr: run 0.05, file 0.01)") in line
    assert (run / "checkpoint.pt").read_bytes() == before and not (run / "final.json").exists()
    assert main(quick + ["--print-commands"]) == 2 and "(lr: run 0.05, file 0.01)" in error_line(capsys)
    assert main(quick + ["--dry-run"]) == 0
    assert f"s0: refuse (made with other settings: lr: run 0.05, file 0.01) -> {run}" in capsys.readouterr().out
    table = collect(path, "quick", only="digits/bp", output_dir=out, report=False)  # reads finished runs only
    assert table["cells"][0]["status"] == "not run"
    path.write_text(TINY)  # the file's settings again: the run resumes and finishes
    if not damage_checkpoint:
        assert main(quick) == 0 and (run / "final.json").is_file()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_device_the_machine_lacks_is_refused_naming_the_cell(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tiny_file(tmp_path, TINY.replace('row = "fa"', 'row = "fa"\nconfig = { device = "cuda" }', 1))
    out = tmp_path / "out"
    assert main(["reproduce", str(path), "--scale", "smoke", "--only", "digits/fa", "--output-dir", str(out),
                 "--no-report", "--no-progress"]) == 2
    assert error_line(capsys) == ("bioprop: error: cell digits/fa: device 'cuda' asked for, but torch sees no CUDA "
                                  "GPU; allowed here: auto, cpu")
    assert not (out / "smoke" / "digits" / "fa" / "s0").exists()


def test_under_torchrun_cells_with_different_devices_are_refused_before_any_group_forms(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bioprop.engine import distributed
    path = tiny_file(tmp_path, TINY.replace('row = "fa"', 'row = "fa"\nconfig = { device = "cuda:0" }', 1))
    monkeypatch.setattr(distributed, "detect", lambda: distributed.DistEnv(rank=0, world_size=2))
    monkeypatch.setattr(distributed, "setup", lambda *_: pytest.fail("a process group was joined"))
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ExperimentError, match=r"the selected cells ask for different devices \(cpu: digits/bp, "
                                              r"wide/fa; cuda:0: digits/fa\); run them in separate calls with --only"):
        reproduce(path, "smoke", output_dir=tmp_path / "out", report=False, verbose=False, log=quiet)
    same = tiny_file(tmp_path, TINY.replace('row = "fa"', 'row = "fa"\nconfig = { device = "cpu" }', 1))
    with pytest.raises(pytest.fail.Exception, match="a process group was joined"):  # auto is cpu here: no refusal
        reproduce(same, "smoke", output_dir=tmp_path / "out2", report=False, verbose=False, log=quiet)


def test_a_run_resumed_by_hand_at_a_lower_lr_is_refused_even_when_the_file_now_agrees(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """config.json and the checkpoint hold the latest session's settings; the log's lr_change shows the mix."""
    from bioprop.experiments import execute, make_plan

    path = tiny_file(tmp_path)
    out = tmp_path / "out"

    class Killed(Exception):
        pass

    def kill(info: object) -> None:
        if getattr(info, "step") == 6:
            raise Killed

    with pytest.raises(Killed):
        execute(make_plan(load_experiment(path), "quick", 1, "digits/bp", out), verbose=False, on_step=kill,
                log=lambda _: None)
    run = out / "quick" / "digits" / "bp" / "s0"
    assert main(["train", "--resume", "--output-dir", str(run), "--lr", "0.01", "--no-progress"]) == 0
    path.write_text(TINY.replace("lr = 0.05", "lr = 0.01", 1))  # the file now says what the last session used
    quick = ["reproduce", str(path), "--scale", "quick", "--only", "digits/bp", "--output-dir", str(out),
             "--no-report", "--no-progress"]
    assert main(quick) == 2
    assert "(lr changed during the run: 0.05 -> 0.01 at epoch 1)" in error_line(capsys)
    assert main(quick + ["--collect"]) == 2 and "lr changed during the run" in error_line(capsys)


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


def test_a_run_that_never_evaluated_leaves_its_cell_partial(finished: tuple[Path, Path]) -> None:
    path, out = finished
    final = out / "smoke" / "digits" / "bp" / "s0" / "final.json"
    final.write_text(json.dumps({**json.loads(final.read_text()), "final_test_error": None, "epochs": "1"}))
    table = collect(path, "smoke", only="digits/bp", output_dir=out, report=False)
    (cell,) = [c for c in table["cells"] if c["id"] == "digits/bp"]
    assert cell["status"] == "partial" and cell["mean"] is None and cell["seeds_done"] == 0
    assert cell["reason"] == ("seed 0: finished without a test value (never evaluated; delete its run directory "
                              "to run it again)")
    assert cell["epochs"] is None  # a wrong-typed count is not shown (nor compared)
    claims = {c["id"]: c["verdict"] for c in table["claims"]}
    assert claims["fa_behind"] == "not testable here"


@pytest.mark.parametrize("name, text, reason", [
    ("final.json", "[" * 100000, "not valid JSON"),  # nesting deeper than the parser's recursion
    ("final.json", '{"final_test_error": NaN}', "final_test_error is nan, not a finite number"),
    ("diverged.json", "[]", "a JSON list, not an object"),
])
def test_dry_run_and_run_agree_on_a_damaged_record(finished: tuple[Path, Path], name: str, text: str,
                                                   reason: str, capsys: pytest.CaptureFixture) -> None:
    path, out = finished
    run = out / "smoke" / "digits" / "bp" / "s0"
    if name == "diverged.json":
        (run / "final.json").unlink()
    (run / name).write_text(text)
    assert main(argv(path, out, "--dry-run")) == 0
    dry = capsys.readouterr().out
    assert f"s0: refuse ({run / name} is damaged (" in dry and reason in dry
    assert main(argv(path, out)) == 2
    assert reason in error_line(capsys)


def test_a_finished_run_without_config_is_refused_in_the_same_words_by_run_and_dry_run(
        finished: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    path, out = finished
    run = out / "smoke" / "digits" / "bp" / "s0"
    (run / "config.json").unlink()
    words = f"{run} holds a finished run without config.json, so its settings cannot be checked"
    assert main(argv(path, out, "--dry-run")) == 0
    assert words in capsys.readouterr().out
    assert main(argv(path, out)) == 2
    assert words in error_line(capsys)
    assert main(argv(path, out, "--collect", "--seeds", "1")) == 2
    assert words in error_line(capsys)
    assert main(argv(path, out, "--collect")) == 2  # each cell's seeds on disk: the run still counts as one
    assert words in error_line(capsys)


def test_a_run_directory_that_is_a_file_is_refused_by_dry_run_as_by_the_run(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    path, out = tiny_file(tmp_path), tmp_path / "out"
    run = out / "smoke" / "digits" / "bp" / "s0"
    run.parent.mkdir(parents=True)
    run.write_text("")
    words = f"output_dir {run} is a file; allowed: a directory"
    assert main(argv(path, out, "--dry-run")) == 0
    assert f"s0: refuse ({words}" in capsys.readouterr().out
    assert main(argv(path, out)) == 2
    assert words in error_line(capsys)


def test_a_damaged_log_of_a_finished_run_is_warned_about_when_its_report_is_drawn(
        finished: tuple[Path, Path]) -> None:
    path, out = finished
    run = out / "smoke" / "digits" / "bp" / "s0"
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"kind": "epoch", "ep')  # a line cut short
    with pytest.warns(RunWarning, match=rf"^{run}: 1 unreadable line\(s\) in metrics.jsonl were skipped; its "
                                        "figures may miss records$"):
        collect(path, "smoke", only="digits/bp", output_dir=out, report=True)


@pytest.mark.parametrize("keep_previous", [False, True])
def test_an_interrupted_run_whose_checkpoints_cannot_be_read_says_to_delete_it(
        finished: tuple[Path, Path], keep_previous: bool, capsys: pytest.CaptureFixture) -> None:
    """A damaged checkpoint.pt with a good checkpoint.prev.pt resumes from that one (the engine falls back); with
    neither readable, the run is refused in one line that names the way on (delete the run directory)."""
    path, out = finished
    run = out / "smoke" / "digits" / "bp" / "s0"
    (run / "final.json").unlink()
    checkpoint = run / "checkpoint.pt"
    if keep_previous:
        shutil.copyfile(checkpoint, run / "checkpoint.prev.pt")
    else:
        (run / "checkpoint.prev.pt").unlink(missing_ok=True)
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # a truncated file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the engine's note about the fallback
        code = main(argv(path, out))
    if keep_previous:
        assert code == 0 and (run / "final.json").is_file()
    else:
        assert code == 2
        line = error_line(capsys)
        assert "cannot read checkpoint" in line and line.endswith(f"delete {run} to run it again from the start")


@pytest.mark.parametrize("key, value, refused", [
    ("eval_every", 2, True),  # which epochs were evaluated decides the best epoch
    ("model_args", {"depth": 1, "width": 17}, True),
    ("compile", True, False),  # how fast it ran, not what it trained
    ("channels_last", True, False),
    ("data_root", "/elsewhere", False),
])
def test_which_settings_make_a_finished_run_another_run(finished: tuple[Path, Path], key: str, value: object,
                                                         refused: bool, capsys: pytest.CaptureFixture) -> None:
    path, out = finished
    run = out / "smoke" / "digits" / "bp" / "s0"
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, key: value}))
    assert main(argv(path, out)) == (2 if refused else 0)
    if refused:
        assert f"({key}: run {value!r}" in error_line(capsys)


def test_a_stale_run_outside_only_is_refused_before_anything_trains(
        finished: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    path, out = finished
    path.write_text(TINY.replace("lr = 0.05", "lr = 0.04", 1))  # digits/bp's finished run is now stale
    fa = ["reproduce", str(path), "--scale", "smoke", "--only", "digits/fa", "--output-dir", str(out),
          "--no-report", "--no-progress"]
    assert main(fa + ["--dry-run"]) == 0
    assert "digits/bp s0 (outside --only, in the table): refuse (made with other settings: lr: run 0.05, file 0.04)" \
        in capsys.readouterr().out
    for mode in ((), ("--print-commands",)):
        assert main(fa + list(mode)) == 2
        assert "cell digits/bp seed 0:" in error_line(capsys)
        assert not (out / "smoke" / "digits" / "fa").exists()  # refused before training or writing anything
    with pytest.raises(ExperimentError, match="cell digits/bp seed 0: .* other settings"):
        collect(path, "smoke", only="digits/fa", output_dir=out, report=False)


def test_a_diverged_cell_says_to_lower_the_files_lr_not_to_resume(tmp_path: Path) -> None:
    path = tiny_file(tmp_path, TINY.replace("lr = 0.05", "lr = 1e38", 1))
    lines: list[str] = []
    table = reproduce(path, "smoke", only="digits/bp", output_dir=tmp_path / "out", report=False, verbose=False,
                      log=lines.append)
    run = tmp_path / "out" / "smoke" / "digits" / "bp" / "s0"
    message = json.loads((run / "diverged.json").read_text())["message"]
    assert message.startswith("training diverged in epoch 1: ")
    assert not (run / "checkpoint.pt").exists()  # epoch 1 never finished: no checkpoint is promised
    assert message.endswith(f"; the run's logs are kept (it diverged before its first checkpoint) in {run}. To run "
                            "the cell again, lower its lr in tiny.toml and delete that directory")
    assert "--resume" not in message and "--overwrite" not in message
    assert any(message in line for line in lines)
    (cell,) = [c for c in table["cells"] if c["id"] == "digits/bp"]
    assert cell["status"] == "diverged" and message in cell["reason"]


def test_list_and_dry_run_only_read_the_output_dir(finished: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    import bioprop.engine.rundir as rundir
    path, out = finished
    monkeypatch.setattr(rundir.os, "access", lambda *_: False)  # as if out were read-only (root may write anything)
    assert main(argv(path, out, "--dry-run")) == 0 and "s0: skip (finished)" in capsys.readouterr().out
    assert main(argv(path, out, "--list")) == 0
    capsys.readouterr()
    for mode in ((), ("--collect",), ("--print-commands",)):
        assert main(argv(path, out, *mode)) == 2
        assert "cannot be created or written" in error_line(capsys)


# ------------------------------------------------------------------------------------------ bad arguments


def _path_of_bytes(base: Path, size: int) -> str:
    """A path under ``base`` of exactly ``size`` bytes, in components of at most 200."""
    text = str(base)
    while len(text) < size:
        if size - len(text) < 3:  # too little left for "/d": lengthen the last component instead
            text += "d" * (size - len(text))
        else:
            text += "/" + "d" * min(200, size - len(text) - 1)
    return text


@pytest.mark.parametrize("extra, message", [
    (["--only", ""], "--only '' holds an empty pattern; allowed: comma-separated shell patterns on the cells "
                     "digits/bp, digits/fa, wide/fa, digits/future, e.g. 'digits/*'"),
    (["--only", "digits/bp,digts/fa"], "--only: 'digts/fa' matches no cell of tiny; allowed:"),
    (["--only", "wide/bp,x"], "--only: 'wide/bp', 'x' match no cell of tiny; allowed:"),
    (["--seeds", "0"], "--seeds must be an integer from 1 to 100, got 0"),
    (["--seeds", "100000"], "--seeds must be an integer from 1 to 100, got 100000"),
    (["--seeds", "abc"], "argument --seeds: 'abc' is not a whole number; allowed: 1..100"),
    (["--output-dir", ""], "--output-dir is empty; allowed: a directory path"),
    (["--output-dir", "a\nb", "--print-commands"], "--output-dir 'a\\nb' holds a control character"),
    (["--output-dir", "a\u2028b", "--dry-run"], "holds a control character or line separator"),
    (["--output-dir", "nu\udcffx", "--dry-run"], "--output-dir 'nu\\udcffx' is not UTF-8; allowed: a UTF-8 path"),
    (["--output-dir", "{tmp}/dangling", "--dry-run"], "output_dir {tmp}/dangling is a broken symbolic link"),
    (["--output-dir", "{fits}", "--dry-run"],  # the output dir fits, the run files of its cells do not
     "--output-dir is too long: the run files of smoke/digits/future/s0 would pass 4096 bytes; allowed: a path"),
    (["--output-dir", "{tmp}/" + "/".join(["d" * 245] * 16), "--dry-run"],
     "is too long: the run files in it would pass 4096 bytes; allowed: a path of at most 3934 bytes"),
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
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    fill = {"file": str(tmp_path / "afile"), "tmp": str(tmp_path), "fits": _path_of_bytes(tmp_path, 3930)}
    extra = [e.format(**fill) for e in extra]
    assert main(["reproduce", str(path), "--scale", "smoke", *extra]) == 2
    assert message.format(**fill) in error_line(capsys)
    assert not (tmp_path / "nothing").exists()  # --collect made nothing


def test_an_id_with_a_trailing_line_break_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExperimentError, match=r"id 'bp\\n' must match \[a-z0-9_\]\+"):
        load_experiment(tiny_file(tmp_path, TINY.replace('id = "bp"', 'id = "bp\\n"', 1)))


def test_an_experiment_path_that_is_a_directory_or_not_utf8_is_refused(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    assert main(["reproduce", f"{tmp_path}/", "--list"]) == 2
    assert f"{tmp_path} is a directory; allowed: an experiment name (akrout2019, " in error_line(capsys)
    assert main(["reproduce", str(tmp_path / "nope.toml"), "--list"]) == 2
    assert (f"experiment file not found: {tmp_path / 'nope.toml'}; allowed: an experiment name (akrout2019, "
            in error_line(capsys))
    (tmp_path / "latin.toml").write_bytes(TINY.replace("8x8", "8\xd78").encode("latin-1"))
    assert main(["reproduce", str(tmp_path / "latin.toml"), "--list"]) == 2
    assert "latin.toml: not UTF-8 text (byte " in error_line(capsys)


# ------------------------------------------------------------------------------------------ bioprop report


@pytest.mark.parametrize("extra, message", [
    (["--output-dir", ""], "--output-dir is empty; allowed: a directory path"),
    (["--output-dir", "{file}"], "output_dir {file} is a file; allowed: a directory"),
    (["--output-dir", "rep\udcffx"], "--output-dir 'rep\\udcffx' is not UTF-8; allowed: a UTF-8 path"),
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


def test_report_warns_on_a_damaged_record(finished: tuple[Path, Path]) -> None:
    path, out = finished
    run = out / "smoke" / "digits" / "bp" / "s0"
    (run / "final.json").write_text("[]")
    with pytest.warns(RunWarning, match=rf"^{run}: final.json does not hold a JSON object; its figures may miss"):
        assert main(["report", str(run), "--output-dir", str(path.parent / "report")]) == 0
    assert (path.parent / "report" / "report.html").is_file()


def test_an_lr_beyond_float32_is_refused_in_one_line(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--set", "lr=1e300", "--dataset", "digits"]) == 2
    assert "lr must be finite and at most 3.403e+38 (what a float32 holds), got 1e+300" in error_line(capsys)
