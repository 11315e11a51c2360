"""``bioprop reproduce``: every shipped experiment file parses and runs at smoke scale on tiny data in the official
formats; resume after a kill, --print-commands + --collect and --collect itself give the same table; bad files
give one line naming the file and the cell; claim verdicts and the aggregation against hand-computed values."""
from __future__ import annotations

import json
import math
import shlex
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bioprop.cli import main
from bioprop.data.cifar import Cifar10Source, Cifar100Source
from bioprop.data.mnist import FashionMnistSource, MnistSource
from bioprop.data.svhn import SvhnSource
from bioprop.engine import read_records
from bioprop.experiments import (Claim, ExperimentError, build_table, collect, list_experiments, load_experiment,
                                 make_plan, mean_std, print_commands, reproduce, run_config, table_plan,
                                 verdict)
from detection_data import write_tiny_coco
from test_data import tiny_mnist, write_cifar10, write_cifar100, write_idx, write_image_folder, write_svhn

SCALES = ("quick", "full", "smoke")


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory):
    """Every data set the files name, written small in its official format; checksums point at these files."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    patch = pytest.MonkeyPatch()
    patch.setattr(MnistSource, "content_sha256", write_idx(root / "mnist", tiny_mnist(0, 24, 6), gz=False))
    patch.setattr(FashionMnistSource, "content_sha256",
                  write_idx(root / "fashion_mnist", tiny_mnist(1, 24, 6), gz=True))
    patch.setattr(FashionMnistSource, "extra_dirs", ())
    _, md5s = write_cifar10(root / "cifar-10-batches-py", rng)
    patch.setattr(Cifar10Source, "train_files", {k: v for k, v in md5s.items() if k != "test_batch"})
    patch.setattr(Cifar10Source, "test_files", {"test_batch": md5s["test_batch"]})
    _, md5s = write_cifar100(root / "cifar100" / "cifar-100-python", rng, sizes=(16, 4))
    patch.setattr(Cifar100Source, "train_files", {"train": md5s["train"]})
    patch.setattr(Cifar100Source, "test_files", {"test": md5s["test"]})
    _, files = write_svhn(root / "svhn", rng, sizes=(16, 4))
    patch.setattr(SvhnSource, "files", files)
    write_image_folder(root / "imagenet")
    write_tiny_coco(root / "coco", "train2017")
    write_tiny_coco(root / "coco", "val2017", seed=1)
    yield root
    patch.undo()


# ------------------------------------------------------------------------------------------ shipped files


@pytest.mark.parametrize("name", list_experiments())
def test_every_file_parses_and_every_cell_config_validates(name: str, tmp_path: Path) -> None:
    experiment = load_experiment(name)
    assert experiment.name == name and experiment.cell_ids()
    for scale in SCALES:
        plan = make_plan(experiment, scale, seeds=2, output_dir=tmp_path)
        for cell in plan.cells:
            assert cell.published is not None or any(cell.id in c.cells for c in experiment.claims), cell.id
            assert cell.published is None or cell.source, cell.id
            if not cell.missing:
                config = run_config(plan, cell, 1)
                row = cell.same_as or cell.row  # a row same_as another shares that row's run directories
                assert config.seed == 1 and Path(config.output_dir) == tmp_path / scale / cell.column / row / "s1"
    smoke = experiment.cells("smoke")
    assert all(c.values.get("max_steps", 0) > 0 for c in smoke), "the smoke scale caps every cell's steps"


@pytest.mark.parametrize("name", list_experiments())
def test_every_cell_runs_at_smoke_scale_and_a_table_comes_out(name: str, data_root: Path, tmp_path: Path) -> None:
    table = reproduce(name, scale="smoke", output_dir=tmp_path, data_root=str(data_root), report=False,
                      verbose=False, log=quiet)
    experiment = load_experiment(name)
    assert [c["id"] for c in table["cells"]] == experiment.cell_ids()  # nothing dropped
    for cell in table["cells"]:
        assert cell["status"] in ("done", "method not implemented"), (cell["id"], cell["status"], cell["reason"])
        if cell["status"] == "method not implemented":
            assert cell["reason"] and cell["mean"] is None
            continue
        run = tmp_path / "smoke" / cell["runs"][0]["run_dir"]
        final = json.loads((run / "final.json").read_text())
        epochs = [r for r in read_records(run / "metrics.jsonl") if r["kind"] == "epoch"]
        if table["metric"] == "ap":  # a detection table: 100 x the run's final box AP
            expected = 100.0 * final["final_ap"]
        else:
            expected = (final["test_error_at_best"] if final["selected_by"] == "val_error"
                        else min(r["test_error"] for r in epochs) if table["metric"] == "best_test_error"
                        else epochs[-1]["test_error"])
        assert cell["mean"] == expected and cell["std"] is None and cell["seeds_done"] == 1
        assert cell["steps"] <= experiment.cells("smoke")[0].values["max_steps"] * cell["epochs"]
        if cell["published"] is not None:
            assert cell["gap"] == pytest.approx(expected - cell["published"])
    on_disk = json.loads((tmp_path / "smoke" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(table))
    markdown = (tmp_path / "smoke" / "results.md").read_text()
    assert all(f"| {c['column_label']} | {c['row_label']} |" in markdown for c in table["cells"])


# ------------------------------------------------------------------------------------------ a small table

TINY = '''
[experiment]
name = "tiny"
title = "A small table on the 8x8 digits"
paper = "test"
source = "made up for the tests"

[defaults]
dataset = "digits"
model = "mlp"
model_args = { depth = 1, width = 16 }
lr = 0.05
batch_size = 64
log_every = 0
metrics_every = 0

[scales.full]
epochs = 3

[scales.quick]
epochs = 2
max_steps = 4

[scales.smoke]
epochs = 1
max_steps = 2

[[columns]]
id = "digits"
label = "Digits MLP"

[[columns]]
id = "wide"
label = "Digits MLP 1x32"
config = { model_args = { width = 32 } }

[[rows]]
id = "bp"
label = "BP"
config = { rule = "backprop" }

[[rows]]
id = "fa"
label = "FA"
config = { rule = "fa" }

[[rows]]
id = "future"
label = "A rule to come"
pending = true
config = { rule = "not_registered_yet", rule_options = { strength = 2 } }

[[cells]]
column = "digits"
row = "bp"
published = 5.0

[[cells]]
column = "digits"
row = "fa"
published = 8.0
note = "FA cell"

[[cells]]
column = "wide"
row = "fa"
config = { lr = 0.02 }
scales.quick = { epochs = 3 }

[[cells]]
column = "digits"
row = "future"
published = 6.0

[[claims]]
id = "fa_behind"
text = "FA is behind BP"
kind = "order"
cells = ["digits/bp", "digits/fa", "wide/fa"]

[[claims]]
id = "future_close"
text = "The rule to come is close to BP"
kind = "within"
cells = ["digits/future", "digits/bp"]
tolerance = 1.0
'''


def tiny_file(tmp_path: Path, text: str = TINY, name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def without_timing(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k != "wall_time_s"}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def test_cell_configs_merge_defaults_column_row_cell_then_scale(tmp_path: Path) -> None:
    cells = {c.id: c for c in load_experiment(tiny_file(tmp_path)).cells("quick")}
    wide = cells["wide/fa"].values
    assert wide["model_args"] == {"depth": 1, "width": 32}  # tables merge key by key
    assert wide["lr"] == 0.02 and wide["rule"] == "fa" and wide["epochs"] == 3 and wide["max_steps"] == 4
    assert cells["digits/bp"].values["epochs"] == 2 and cells["digits/bp"].values["model_args"]["width"] == 16
    assert cells["digits/future"].missing == "rule 'not_registered_yet' is not registered"
    assert cells["digits/fa"].note == "FA cell" and cells["wide/fa"].published is None


def test_kill_and_resume_gives_the_uninterrupted_table(tmp_path: Path) -> None:
    path = tiny_file(tmp_path)
    reference = reproduce(path, "quick", seeds=2, output_dir=tmp_path / "whole", report=False, verbose=False,
                          log=quiet)

    class Killed(Exception):
        pass

    steps = []

    def kill(info: Any) -> None:
        steps.append(info.step)
        if len(steps) == 2 * 8 + 6:  # two finished digits/bp seeds (2 epochs x 4 steps), then mid-epoch 2 of fa s0
            raise Killed

    with pytest.raises(Killed):
        reproduce(path, "quick", seeds=2, output_dir=tmp_path / "killed", report=False, verbose=False,
                  on_step=kill, log=quiet)
    killed = tmp_path / "killed" / "quick"
    assert (killed / "digits" / "bp" / "s1" / "final.json").is_file()
    assert (killed / "digits" / "fa" / "s0" / "checkpoint.pt").is_file()
    assert not (killed / "digits" / "fa" / "s0" / "final.json").exists()
    partial = collect(path, "quick", seeds=2, output_dir=tmp_path / "killed", report=False)
    assert {c["id"]: c["status"] for c in partial["cells"]} == {
        "digits/bp": "done", "digits/fa": "not run", "wide/fa": "not run", "digits/future": "method not implemented"}
    lines: list[str] = []
    resumed = reproduce(path, "quick", seeds=2, output_dir=tmp_path / "killed", report=False, verbose=False,
                        log=lines.append)
    assert len(lines) == 4 and "resuming after epoch 1" in lines[0]  # fa s0 resumed; fa s1, wide s0, s1 started
    assert without_timing(resumed) == without_timing(reference)
    again: list[str] = []
    reproduce(path, "quick", seeds=2, output_dir=tmp_path / "killed", report=False, verbose=False, log=again.append)
    assert len(again) == 1 and "nothing to train" in again[0]  # every run finished: nothing trains


@pytest.mark.parametrize("kill_at, keep_only_previous, action, flag, line", [
    (2, False, "start over (stopped before its first checkpoint)", " --overwrite",
     "starting over (it stopped before its first checkpoint)"),
    (6, True, "resume (checkpoint unreadable: checkpoint.pt is missing)", " --resume",
     "resuming (its checkpoint.pt cannot be read here; the engine falls back to checkpoint.prev.pt)"),
])
def test_a_killed_run_with_no_checkpoint_pt_goes_on_from_what_it_left(
        kill_at: int, keep_only_previous: bool, action: str, flag: str, line: str, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    """A kill in the first epoch leaves logs but no checkpoint: the same command starts that run over. A run left
    with only ``checkpoint.prev.pt`` resumes from it. Either way ``--dry-run`` and ``--print-commands`` say so, and
    the table equals an uninterrupted one."""
    path = tiny_file(tmp_path)
    reference = reproduce(path, "quick", seeds=1, only="digits/bp", output_dir=tmp_path / "whole", report=False,
                          verbose=False, log=quiet)

    class Killed(Exception):
        pass

    def kill(info: Any) -> None:
        if info.step == kill_at:  # 2 epochs of 4 steps: step 2 is before the first checkpoint, 6 after it
            raise Killed

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        reproduce(path, "quick", seeds=1, only="digits/bp", output_dir=out, report=False, verbose=False,
                  on_step=kill, log=quiet)
    run = out / "quick" / "digits" / "bp" / "s0"
    assert (run / "checkpoint.pt").exists() == keep_only_previous and (run / "config.json").is_file()
    if keep_only_previous:
        (run / "checkpoint.pt").rename(run / "checkpoint.prev.pt")
    argv = ["reproduce", str(path), "--scale", "quick", "--only", "digits/bp", "--output-dir", str(out)]
    assert main(argv + ["--dry-run"]) == 0
    assert f"s0: {action}" in capsys.readouterr().out
    assert main(argv + ["--print-commands"]) == 0
    (command,) = capsys.readouterr().out.splitlines()
    assert command.endswith(flag)
    lines: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the engine's RunWarning about the fallback
        again = reproduce(path, "quick", seeds=1, only="digits/bp", output_dir=out, report=False, verbose=False,
                          log=lines.append)
    assert line in lines[0]
    assert without_timing(again) == without_timing(reference)


def test_a_table_file_that_cannot_be_written_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tiny_file(tmp_path)
    reproduce(path, "smoke", seeds=1, only="digits/bp", output_dir=tmp_path, report=False, verbose=False, log=quiet)
    (tmp_path / "smoke" / "results.md").unlink()
    (tmp_path / "smoke" / "results.md").mkdir()
    argv = ["reproduce", str(path), "--scale", "smoke", "--output-dir", str(tmp_path), "--collect", "--no-report"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("bioprop: error: cannot write ") and "results.md is in the way" in err
    written = json.loads((tmp_path / "smoke" / "results.json").read_text())  # whole: atomic
    assert [c["status"] for c in written["cells"] if c["id"] == "digits/bp"] == ["done"]


def test_print_commands_then_collect_gives_the_reproduce_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tiny_file(tmp_path)
    reference = reproduce(path, "smoke", seeds=2, output_dir=tmp_path / "direct", report=False, verbose=False,
                          log=quiet)
    argv = ["reproduce", str(path), "--scale", "smoke", "--seeds", "2", "--output-dir", str(tmp_path / "cluster")]
    assert main(argv + ["--print-commands"]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 6  # 3 runnable cells x 2 seeds; the unregistered rule gets none
    for command in commands:
        words = shlex.split(command)
        assert words[:2] == ["bioprop", "train"]
        assert main(words[1:]) == 0
    capsys.readouterr()
    assert main(argv + ["--print-commands"]) == 0 and capsys.readouterr().out == ""  # nothing left to run
    assert main(argv + ["--collect", "--no-report"]) == 0
    collected = json.loads((tmp_path / "cluster" / "smoke" / "results.json").read_text())
    assert without_timing(collected) == without_timing(json.loads(json.dumps(reference)))
    # --collect over the runs reproduce made writes exactly the files reproduce wrote
    direct = tmp_path / "direct" / "smoke"
    before = {(direct / f).read_text() for f in ("results.json", "results.md")}
    assert main(["reproduce", str(path), "--scale", "smoke", "--seeds", "2", "--output-dir", str(tmp_path / "direct"),
                 "--collect", "--no-report"]) == 0
    assert {(direct / f).read_text() for f in ("results.json", "results.md")} == before


def test_report_list_and_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tiny_file(tmp_path)
    argv = ["reproduce", str(path), "--scale", "smoke", "--output-dir", str(tmp_path / "out")]
    assert main(argv + ["--list"]) == 0
    listing = capsys.readouterr().out
    assert "digits/future" in listing and "method not implemented: rule 'not_registered_yet'" in listing
    assert 'rule="fa"' in listing and "steps/seed 2 " in listing  # 1 epoch, max_steps 2
    assert main(argv + ["--only", "digits/*", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "3 done" not in out and "2 done" in out and "1 method not implemented" in out
    assert "1 not run" in out  # wide/fa: outside --only, still in the table
    report = tmp_path / "out" / "smoke" / "report" / "digits" / "report.html"
    assert report.is_file() and "report/digits/report.html" in (tmp_path / "out" / "smoke" / "results.md").read_text()
    page = report.read_text()
    assert "<li>BP: <code>" in page and "<li>FA: <code>" in page  # runs named by their row labels
    assert main(argv + ["--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "s0: skip (finished)" in dry and "s0: start" in dry  # digits/* ran, wide/fa did not
    before = report.stat().st_mtime_ns
    assert main(argv + ["--collect", "--no-report"]) == 0  # keeps the link to the report it does not redraw
    assert report.stat().st_mtime_ns == before
    assert ("- Digits MLP (from an earlier call, not redrawn): [report/digits/report.html](report/digits/report.html)"
            in (tmp_path / "out" / "smoke" / "results.md").read_text())
    assert "Digits MLP 1x32" not in (tmp_path / "out" / "smoke" / "results.md").read_text().split("## Analysis")[1]
    stale = tmp_path / "out" / "smoke" / "figures" / "future_close.png"  # a figure nothing would draw now
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"old")
    assert main(argv + ["--collect", "--no-report"]) == 0
    assert "future_close.png" not in (tmp_path / "out" / "smoke" / "results.md").read_text()


def test_a_column_report_goes_once_its_runs_are_gone(tmp_path: Path) -> None:
    """The report of a column whose finished runs were removed is removed by the next call that draws reports,
    with its figures; a file of the user's in that folder is kept."""
    from bioprop.report import FIGURE_IDS
    path = tiny_file(tmp_path)
    reproduce(path, "smoke", seeds=1, only="digits/bp", output_dir=tmp_path, verbose=False, log=quiet)
    folder = tmp_path / "smoke" / "report" / "digits"
    assert (folder / "report.html").is_file() and (folder / "fig-learning-curves.png").is_file()
    collect(path, "smoke", seeds=1, output_dir=tmp_path)  # runs still there: the report is redrawn, not removed
    assert (folder / "report.html").is_file()
    (folder / "notes.txt").write_text("mine")
    shutil.rmtree(tmp_path / "smoke" / "digits" / "bp")
    table = collect(path, "smoke", seeds=1, output_dir=tmp_path)
    assert {c["status"] for c in table["cells"] if c["column"] == "digits"} == {"not run", "method not implemented"}
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert "report/digits" not in (tmp_path / "smoke" / "results.md").read_text()
    (folder / "notes.txt").unlink()
    for fig_id in FIGURE_IDS[:2]:  # a folder left with only report files goes too
        (folder / f"fig-{fig_id}.png").write_bytes(b"old")
    collect(path, "smoke", seeds=1, output_dir=tmp_path)
    assert not folder.exists()


def test_collect_keeps_finished_runs_where_the_data_is_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs made on another machine (a cluster sharing the directory) enter the table on one without the data;
    only cells with nothing on disk are "data not present"."""
    import bioprop.experiments.results as results
    path = tiny_file(tmp_path)
    reference = reproduce(path, "smoke", seeds=2, only="digits/bp", output_dir=tmp_path, report=False,
                          verbose=False, log=quiet)
    monkeypatch.setattr(results, "data_missing", lambda cell, root: "put the digits in the data root")
    table = collect(path, "smoke", seeds=2, output_dir=tmp_path, report=False)
    cells = {c["id"]: c for c in table["cells"]}
    before = {c["id"]: c for c in reference["cells"]}
    assert cells["digits/bp"]["status"] == "done" and cells["digits/bp"]["seeds_done"] == 2
    assert cells["digits/bp"]["mean"] == before["digits/bp"]["mean"] is not None
    assert cells["wide/fa"]["status"] == "data not present" and cells["wide/fa"]["runs"] == []
    partial = {c["id"]: c for c in collect(path, "smoke", seeds=3, output_dir=tmp_path, report=False)["cells"]}
    assert partial["digits/bp"]["status"] == "partial"
    assert partial["digits/bp"]["reason"] == ("2 of 3 seeds finished; the others cannot run here: data not "
                                              "present: put the digits in the data root")


def test_missing_data_is_reported_with_how_to_get_it(tmp_path: Path) -> None:
    text = TINY.replace('dataset = "digits"', 'dataset = "svhn"')
    table = collect(tiny_file(tmp_path, text), "smoke", output_dir=tmp_path, data_root=str(tmp_path / "empty"),
                    report=False)
    statuses = {c["id"]: (c["status"], c["reason"]) for c in table["cells"]}
    assert statuses["digits/bp"][0] == "data not present" and "train_32x32.mat" in statuses["digits/bp"][1]
    assert statuses["digits/bp"][1].startswith(f"not found under the data root {tmp_path / 'empty'}. ")  # as given
    assert statuses["digits/future"][0] == "method not implemented"
    assert {c["id"]: c["verdict"] for c in table["claims"]} == {"fa_behind": "not testable here",
                                                                  "future_close": "not testable here"}


# ------------------------------------------------------------------------------------------ bad files

SAME_AS = TINY.replace('''[[cells]]
column = "digits"
row = "future"''', '''[[rows]]
id = "fa_again"
label = "FA under another name"
same_as = "fa"
config = { rule = "fa", rule_options = {} }

[[cells]]
column = "digits"
row = "fa_again"
published = 8.5

[[cells]]
column = "digits"
row = "future"''')



@pytest.mark.parametrize("old, new, message, text", [(*case, TINY) for case in [
    ('published = 8.0\nnote = "FA cell"', 'published = 8.0\nbogus = 1', r"cell digits/fa: unknown key 'bogus'"),
    ("config = { lr = 0.02 }", "config = { lr = 0.02, learning_rate = 1 }",
     r"cell wide/fa \(scale \w+\): unknown config key 'learning_rate'"),
    ('config = { lr = 0.02 }', 'config = { lr = "fast" }', r"cell wide/fa \(scale \w+\): lr must be a number"),
    ('[[claims]]\nid = "fa_behind"', '[[cells]]\ncolumn = "wide"\nrow = "bp"\n\n[[claims]]\nid = "fa_behind"',
     r"cell wide/bp: no published value and no claim mentions it"),
    ('column = "digits"\nrow = "fa"', 'column = "digits"\nrow = "ff"', r"cell digits/ff: unknown row 'ff'"),
    ('column = "wide"', 'column = "narrow"', r"cell narrow/fa: unknown column 'narrow'"),
    ('source = "made up for the tests"', 'status = "verified"', r"cell digits/bp: published value without a source"),
    ("lr = 0.05", "lr = 0.05\nseed = 3", r"\[defaults\]: 'seed' is set by bioprop reproduce"),
    ('cells = ["digits/bp", "digits/fa", "wide/fa"]', 'cells = ["digits/bp", "wide/fa", "wide/bp"]',
     r"claim 'fa_behind': unknown cell 'wide/bp'"),
    ('kind = "within"', 'kind = "near"', r"claim 'future_close': kind 'near'; allowed: order, within, below, best_of"),
    ('kind = "order"\ncells = ["digits/bp", "digits/fa", "wide/fa"]', 'kind = "best_of"\ncells = ["digits/bp"]',
     r"claim 'fa_behind': kind 'best_of' needs at least 2 cell ids"),
    ('[scales.smoke]\nepochs = 1', '[scales.tiny]\nepochs = 1', r"\[scales\]: unknown scale 'tiny'"),
    ('name = "tiny"', 'name = "small"', r"\[experiment\]: name 'small' must equal the file name 'tiny'"),
]] + [(*case, SAME_AS) for case in [  # rows same_as another
    ('same_as = "fa"', 'same_as = "fx"', r"row 'fa_again': same_as 'fx'; allowed: the id of another row"),
    ('same_as = "fa"', 'same_as = "fa_again"', r"row 'fa_again': same_as 'fa_again'; allowed: the id of another"),
    ('id = "fa"\nlabel = "FA"', 'id = "fa"\nlabel = "FA"\nsame_as = "bp"',
     r"row 'fa_again': same_as 'fa' is itself the same as 'bp'; name 'bp'"),
    ('id = "wide"', 'id = "wide"\nsame_as = "digits"', r"column 'wide': same_as is a key of rows only"),
    ('column = "digits"\nrow = "fa"\npublished = 8.0\nnote = "FA cell"', 'column = "wide"\nrow = "bp"\npublished = 1.0',
     r"cell digits/fa_again: row 'fa_again' is the same as row 'fa', but the file lists no cell digits/fa"),
    ('row = "fa_again"\npublished = 8.5', 'row = "fa_again"\npublished = 8.5\nconfig = { lr = 0.5 }',
     r"cell digits/fa_again: row 'fa_again' is the same as row 'fa', so its cells train that row's cells; remove"),
    ('same_as = "fa"', 'same_as = "fa"\nscales = { quick = { epochs = 9 } }',
     r"row 'fa_again': same_as 'fa': its runs are that row's at every scale; remove scales from the row"),
    ('config = { rule = "fa" }', 'config = { rule = "fa", lr = 0.5 }',
     r"cell digits/fa_again \(scale \w+\): its row is the same as row 'fa', but their cells differ in lr, which the "
     r"row does not set"),
    ('cells = ["digits/future", "digits/bp"]', 'cells = ["digits/fa", "digits/fa_again"]',
     r"claim 'future_close': cells digits/fa and digits/fa_again show the same runs \(same_as\)"),
]])
def test_a_bad_file_gives_one_line_naming_the_file_and_the_cell(tmp_path: Path, old: str, new: str, message: str,
                                                                text: str, capsys: pytest.CaptureFixture) -> None:
    assert old in text
    path = tiny_file(tmp_path, text.replace(old, new, 1))
    with pytest.raises(ExperimentError, match=r"^tiny\.toml: " + message):
        load_experiment(path)
    assert main(["reproduce", str(path), "--list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bioprop: error: tiny.toml: ")


def test_an_unregistered_rule_is_an_error_unless_pending(tmp_path: Path) -> None:
    load_experiment(tiny_file(tmp_path))  # 'not_registered_yet' loads (pending): the cell is reported, not dropped
    text = TINY.replace("pending = true\n", "")
    with pytest.raises(ExperimentError, match=r"cell digits/future .*rule 'not_registered_yet' is not registered "
                                              r"\(mark the row, column or cell `pending = true`"):
        load_experiment(tiny_file(tmp_path, text))
    text = TINY.replace("rule_options = { strength = 2 }", "rule_options = { strength = 2 }, rule_opts = {}")
    with pytest.raises(ExperimentError, match="cell digits/future .*unknown config key 'rule_opts'"):
        load_experiment(tiny_file(tmp_path, text))
    text = TINY.replace('config = { rule = "fa" }', 'config = { rule = "fa", rule_options = { strength = 2 } }')
    with pytest.raises(ExperimentError, match=r"cell digits/fa .*strength"):  # a typo in a rule option
        load_experiment(tiny_file(tmp_path, text))


# ------------------------------------------------------------------------------------------ verdicts


def entry(mean: float | None, status: str = "done") -> dict[str, Any]:
    return {"mean": mean, "status": status}


def test_claim_verdicts_on_hand_made_results() -> None:
    order = Claim("o", "a < b < c", "order", ("a", "b", "c"), margin=0.5)
    assert verdict(order, {"a": entry(1.0), "b": entry(1.5), "c": entry(3.0)})["verdict"] == "holds"
    assert verdict(order, {"a": entry(1.0), "b": entry(1.4), "c": entry(3.0)})["verdict"] == "does not hold"
    within = Claim("w", "a near b", "within", ("a", "b"), tolerance=0.3)
    assert verdict(within, {"a": entry(1.2), "b": entry(1.0)})["verdict"] == "holds"
    assert verdict(within, {"a": entry(0.6), "b": entry(1.0)})["verdict"] == "does not hold"
    below = Claim("b", "a below 2", "below", ("a",), threshold=2.0)
    assert verdict(below, {"a": entry(2.0)})["verdict"] == "holds"
    assert verdict(below, {"a": entry(2.01)})["verdict"] == "does not hold"
    best = Claim("s", "a or b beats c", "best_of", ("a", "b", "c"), margin=0.5)
    assert verdict(best, {"a": entry(3.0), "b": entry(1.5), "c": entry(2.0)})["verdict"] == "holds"  # b, the best
    assert verdict(best, {"a": entry(1.6), "b": entry(3.0), "c": entry(2.0)})["verdict"] == "does not hold"
    assert "the best of the first, b," in verdict(best, {"a": entry(3.0), "b": entry(1.5), "c": entry(2.0)})["reason"]
    assert verdict(best, {"a": entry(0.1), "b": entry(1.0, "diverged"), "c": entry(2.0)}) == {
        "verdict": "not testable here", "reason": "b is diverged"}
    missing = verdict(within, {"a": entry(None, "data not present"), "b": entry(1.0)})
    assert missing == {"verdict": "not testable here", "reason": "a is data not present"}
    assert verdict(within, {"a": entry(1.0, "partial"), "b": entry(1.0)})["verdict"] == "not testable here"
    assert verdict(below, {})["reason"] == "a is not selected"


def test_mean_and_sample_std_match_numpy() -> None:
    values = [1.25, 2.5, 0.75, 4.0]
    mean, std = mean_std(values)
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    assert mean_std([3.0]) == (3.0, None) and mean_std([]) == (None, None)
    assert math.isclose(mean_std([2.0, 2.0])[1], 0.0)


def test_seeds_aggregate_and_the_gap_is_ours_minus_published(tmp_path: Path) -> None:
    path = tiny_file(tmp_path)
    table = reproduce(path, "smoke", seeds=3, only="digits/bp", output_dir=tmp_path, report=False, verbose=False,
                      log=quiet)
    (cell,) = [c for c in table["cells"] if c["id"] == "digits/bp"]
    errors = [json.loads((tmp_path / "smoke" / r["run_dir"] / "final.json").read_text())["final_test_error"]
              for r in cell["runs"]]
    assert [r["seed"] for r in cell["runs"]] == [0, 1, 2] and len(set(errors)) > 1  # seeds differ
    assert cell["mean"] == pytest.approx(np.mean(errors)) and cell["std"] == pytest.approx(np.std(errors, ddof=1))
    assert cell["gap"] == pytest.approx(np.mean(errors) - 5.0) and cell["seeds_done"] == 3
    assert build_table(table_plan(make_plan(load_experiment(path), "smoke", 3, "digits/bp", tmp_path))) == table
    claims = {c["id"]: c for c in table["claims"]}
    assert claims["fa_behind"]["verdict"] == "not testable here"


def test_running_part_of_a_table_keeps_the_rest_of_it(tmp_path: Path) -> None:
    """``--only`` chooses what trains, not what the table shows: after three seeds of one cell and one seed of
    another, each in its own call, results.md holds both cells with their own seeds, and the cells never run."""
    path = tiny_file(tmp_path)
    reproduce(path, "smoke", seeds=3, only="digits/bp", output_dir=tmp_path, report=False, verbose=False, log=quiet)
    table = reproduce(path, "smoke", seeds=1, only="digits/fa", output_dir=tmp_path, report=False, verbose=False,
                      log=quiet)
    cells = {c["id"]: c for c in table["cells"]}
    assert set(cells) == set(load_experiment(path).cell_ids())
    assert cells["digits/bp"]["seeds"] == [0, 1, 2] and cells["digits/bp"]["seeds_done"] == 3
    errors = [json.loads((tmp_path / "smoke" / "digits" / "bp" / f"s{i}" / "final.json").read_text())
              ["final_test_error"] for i in range(3)]
    assert cells["digits/bp"]["mean"] == pytest.approx(np.mean(errors))
    assert cells["digits/fa"]["seeds"] == [0] and cells["digits/fa"]["status"] == "done"
    assert cells["wide/fa"]["status"] == "not run" and table["seeds"] == [0, 1, 2]
    markdown = (tmp_path / "smoke" / "results.md").read_text()
    assert "| Digits MLP | BP |" in markdown and "| 3/3 |" in markdown and "| Digits MLP | FA |" in markdown


def test_collect_without_seeds_counts_each_cells_seeds_on_disk(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """Three seeds of one cell and one of another: ``--collect`` without ``--seeds`` gives each cell the seeds it
    has (both ``done``); ``--seeds 3`` makes the one-seed cell ``partial``, so no claim reads it; ``--only`` with ``--seeds`` still chooses which cells count the requested seeds."""
    path = tiny_file(tmp_path)
    reproduce(path, "smoke", seeds=3, only="digits/bp", output_dir=tmp_path, report=False, verbose=False, log=quiet)
    reproduce(path, "smoke", seeds=1, only="digits/fa", output_dir=tmp_path, report=False, verbose=False, log=quiet)
    finals = {(row, i): json.loads(p.read_text())["final_test_error"] for row, i, p in
              [(row, i, tmp_path / "smoke" / "digits" / row / f"s{i}" / "final.json") for row in ("bp", "fa")
               for i in range(3)] if p.exists()}
    assert sorted(finals) == [("bp", 0), ("bp", 1), ("bp", 2), ("fa", 0)]

    on_disk = {c["id"]: c for c in collect(path, "smoke", output_dir=tmp_path, report=False)["cells"]}
    assert on_disk["digits/bp"]["seeds"] == [0, 1, 2] and on_disk["digits/bp"]["status"] == "done"
    assert on_disk["digits/bp"]["mean"] == pytest.approx(np.mean([finals["bp", i] for i in range(3)]))
    assert on_disk["digits/fa"]["seeds"] == [0] and on_disk["digits/fa"]["status"] == "done"
    assert on_disk["digits/fa"]["mean"] == pytest.approx(finals["fa", 0])
    assert on_disk["wide/fa"]["status"] == "not run" and on_disk["wide/fa"]["seeds"] == []  # none on disk

    three = {c["id"]: c for c in collect(path, "smoke", seeds=3, output_dir=tmp_path, report=False)["cells"]}
    assert three["digits/bp"]["status"] == "done"
    assert three["digits/fa"]["status"] == "partial" and three["digits/fa"]["reason"] == "1 of 3 seeds finished"
    only = {c["id"]: c for c in collect(path, "smoke", seeds=3, only="digits/bp", output_dir=tmp_path,
                                        report=False)["cells"]}
    assert only["digits/fa"]["seeds"] == [0] and only["digits/fa"]["status"] == "done"

    assert main(["reproduce", str(path), "--scale", "smoke", "--output-dir", str(tmp_path), "--collect",
                 "--no-report"]) == 0
    assert "| 3/3 |" in (tmp_path / "smoke" / "results.md").read_text()
    assert "| Digits MLP 1x32 | FA | - | - | - | - | - | - | - | not run |" in (tmp_path / "smoke" / "results.md").read_text()
    written = json.loads((tmp_path / "smoke" / "results.json").read_text())
    assert {c["id"]: c["seeds"] for c in written["cells"]}["digits/fa"] == [0]
    assert {c["id"]: c["status"] for c in written["cells"]}["digits/fa"] == "done"
    capsys.readouterr()


def test_print_commands_resume_an_interrupted_run(tmp_path: Path) -> None:
    path = tiny_file(tmp_path)
    plan = make_plan(load_experiment(path), "quick", 1, "digits/bp", tmp_path)

    class Killed(Exception):
        pass

    def kill(info: Any) -> None:
        if info.step == 6:
            raise Killed

    from bioprop.experiments import execute
    with pytest.raises(Killed):
        execute(plan, verbose=False, on_step=kill, log=quiet)
    (command,) = print_commands(plan)
    assert command.endswith("--resume")
    assert main(shlex.split(command)[1:]) == 0
    assert build_table(plan)["cells"][0]["status"] == "done"


def test_claim_figures_show_each_cell_of_an_order_claim_with_what_it_has(tmp_path: Path) -> None:
    """A figure needs an ``order`` claim over three or more cells, two with a mean; a diverged or unrun cell is
    marked by its status, a partial one keeps its mean and says how many seeds finished."""
    from bioprop.experiments.results import claim_points, write_claim_figures

    def cell(ident: str, mean: float | None, status: str = "done", std: float | None = None,
             seeds: int = 1) -> dict[str, Any]:
        return {"id": ident, "row_label": ident.split("/")[1], "status": status, "mean": mean, "std": std,
                "seeds": list(range(seeds)), "seeds_done": 1}
    cells = [cell("d/p0", 9.0, std=0.5), cell("d/p05", 5.0), cell("d/p1", 2.0), cell("d/q", None, "not run"),
             cell("d/div", 7.0, "diverged", seeds=2), cell("d/half", 4.0, "partial", seeds=3)]
    table = {"metric": "test_error", "cells": cells,
             "claims": [{"id": "falls", "kind": "order", "verdict": "does not hold", "cells": ["d/p1", "d/p05", "d/p0"]},
                        {"id": "pair", "kind": "order", "verdict": "holds", "cells": ["d/p1", "d/p0"]},
                        {"id": "open", "kind": "order", "verdict": "not testable here",
                         "cells": ["d/p1", "d/half", "d/div", "d/q"]},
                        {"id": "lonely", "kind": "order", "verdict": "not testable here",
                         "cells": ["d/p1", "d/div", "d/q"]},
                        {"id": "near", "kind": "within", "verdict": "holds", "cells": ["d/p1", "d/p05", "d/p0"]}]}
    by_id = {c["id"]: c for c in cells}
    assert claim_points(table["claims"][0], by_id) == [("p1", 2.0, 0.0, ""), ("p05", 5.0, 0.0, ""),
                                                       ("p0", 9.0, 0.5, "")]
    opened = claim_points(table["claims"][2], by_id)
    assert opened is not None and opened[:2] == [("p1", 2.0, 0.0, ""), ("half", 4.0, 0.0, "1/3 seeds")]
    assert [(label, math.isnan(mean), mark) for label, mean, _, mark in opened[2:]] == [
        ("div", True, "diverged"), ("q", True, "not run")]  # a diverged cell's finished seed is not drawn
    assert claim_points(table["claims"][3], by_id) is None  # one mean only
    (tmp_path / "figures").mkdir()
    for name in ("lonely.png", "mine.png"):  # an earlier call's figure of "lonely", and a file of the user's
        (tmp_path / "figures" / name).write_bytes(b"old")
    figures = write_claim_figures(table, tmp_path)
    assert figures == {"falls": "figures/falls.png", "open": "figures/open.png"}
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["falls.png", "mine.png", "open.png"]
    for name in figures.values():
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ rows same_as another

def test_a_row_same_as_another_shows_that_rows_runs_and_trains_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_file(tmp_path, SAME_AS)
    experiment = load_experiment(path)
    cells = {c.id: c for c in experiment.cells("smoke")}
    again, fa = cells["digits/fa_again"], cells["digits/fa"]
    assert again.same_as == "fa" and again.values == fa.values and again.row_label == "FA under another name"
    assert again.stated_values is not None and again.stated_values["rule_options"] == {}
    assert again.published == 8.5 and fa.same_as == "" and fa.stated_values is None
    lines: list[str] = []
    table = reproduce(path, "smoke", seeds=2, only="digits/fa_again,digits/fa", output_dir=tmp_path, report=False,
                      verbose=False, log=lines.append)
    assert len(lines) == 2  # two runs (fa s0, s1), not four
    assert sorted(p.name for p in (tmp_path / "smoke" / "digits").iterdir()) == ["fa"]
    by_id = {c["id"]: c for c in table["cells"]}
    assert by_id["digits/fa_again"]["same_as"] == "digits/fa" and by_id["digits/fa"]["same_as"] is None
    assert by_id["digits/fa_again"]["status"] == "done" and by_id["digits/fa_again"]["runs"] == by_id["digits/fa"]["runs"]
    assert by_id["digits/fa_again"]["mean"] == by_id["digits/fa"]["mean"] is not None
    assert by_id["digits/fa_again"]["gap"] == pytest.approx(by_id["digits/fa"]["mean"] - 8.5)
    assert "done (the runs of digits/fa) |" in (tmp_path / "smoke" / "results.md").read_text()
    argv = ["reproduce", str(path), "--scale", "smoke", "--seeds", "2", "--output-dir", str(tmp_path)]
    assert main(argv + ["--only", "digits/fa_again", "--print-commands"]) == 0
    assert capsys.readouterr().out == ""  # fa's runs are finished, so the row same_as fa has nothing to run
    assert main(argv + ["--only", "digits/fa*", "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "ready (the runs of digits/fa)" in dry and dry.count("skip (finished) -> ") == 2
    assert dry.count("shared with digits/fa -> ") == 2
    assert "\n0 steps left to run" in dry
    import bioprop.experiments.cli as experiments_cli
    monkeypatch.setattr(experiments_cli, "steps_per_cell", lambda cell: 5)  # a round count per run
    assert main(argv + ["--only", "digits/fa*", "--list"]) == 0
    assert "\n10 steps in all" in capsys.readouterr().out  # 5 steps x 2 seeds of one run directory, counted once


def test_only_the_row_same_as_another_trains_that_rows_runs(tmp_path: Path) -> None:
    path = tiny_file(tmp_path, SAME_AS)
    lines: list[str] = []
    table = reproduce(path, "smoke", seeds=1, only="digits/fa_again", output_dir=tmp_path, report=False,
                      verbose=False, log=lines.append)
    by_id = {c["id"]: c for c in table["cells"]}
    assert (tmp_path / "smoke" / "digits" / "fa" / "s0" / "final.json").is_file()
    assert "tiny digits/fa_again (the runs of digits/fa) seed 0: starting in " in lines[0]
    assert by_id["digits/fa"]["status"] == by_id["digits/fa_again"]["status"] == "done"
    # asking for two seeds of either cell asks for them of both: the same runs never get two statuses
    for only in ("digits/fa_again", "digits/fa"):
        two = {c["id"]: c for c in collect(path, "smoke", seeds=2, only=only, output_dir=tmp_path,
                                           report=False)["cells"]}
        assert two["digits/fa"]["seeds"] == two["digits/fa_again"]["seeds"] == [0, 1]
        assert two["digits/fa"]["status"] == two["digits/fa_again"]["status"] == "partial"


def test_runs_of_no_cell_are_named_and_left_out_of_the_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Run directories under a folder the table does not read (a row since renamed, or made same_as another, whose
    own folder no cell reads) are named by --dry-run and after a table is written, never counted in it."""
    import shutil

    from bioprop.experiments.runner import unclaimed_runs
    path = tiny_file(tmp_path, SAME_AS)
    reproduce(path, "smoke", seeds=1, only="digits/fa", output_dir=tmp_path, report=False, verbose=False,
              log=lambda line: None)
    digits = tmp_path / "smoke" / "digits"
    shutil.copytree(digits / "fa", digits / "fa_again")  # the alias's own name: its cells read fa's folder
    shutil.copytree(digits / "fa" / "s0", digits / "old" / "s3")
    (digits / "empty" / "s0").mkdir(parents=True)  # no config.json: not a run directory
    plan = make_plan(load_experiment(path), "smoke", output_dir=tmp_path)
    assert unclaimed_runs(plan) == {"digits/fa_again": 1, "digits/old": 1}
    argv = ["reproduce", str(path), "--scale", "smoke", "--output-dir", str(tmp_path)]
    note = (f"note: {tmp_path / 'smoke'} holds runs that are no cell of tiny at scale smoke, left out of the table: "
            "digits/fa_again (1 run), digits/old (1 run)")
    assert main(argv + ["--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-2] == note
    assert main(argv + ["--collect"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == note
    table = json.loads((tmp_path / "smoke" / "results.json").read_text())
    assert not any("old" in str(cell["runs"]) or cell["id"].endswith("/old") for cell in table["cells"])
    shutil.rmtree(digits / "fa_again")
    shutil.rmtree(digits / "old")
    assert unclaimed_runs(plan) == {}
    assert main(argv + ["--collect"]) == 0
    assert "note:" not in capsys.readouterr().out


def test_shipped_rows_same_as_another_train_bit_for_bit_as_it(data_root: Path, tmp_path: Path) -> None:
    """What a file asserts with same_as holds: the row's own config and the other row's train to the same weights
    (and rule state) for several steps, with the same seed, in the first column each such row has."""
    import torch
    from bioprop.engine import train
    from bioprop.engine.checkpoint import load_checkpoint
    from bioprop.engine.config import config_from_dict

    checked = []
    for name in list_experiments():
        seen = set()
        for cell in load_experiment(name).cells("smoke"):
            if not cell.same_as or cell.row in seen:
                continue
            seen.add(cell.row)
            states = []
            for which, values, seed in (("stated", cell.stated_values, 3), ("same_as", cell.values, 3),
                                        ("other_seed", cell.stated_values, 4)):
                out = tmp_path / name / cell.row / which
                assert values is not None
                train(config_from_dict(dict(values, seed=seed, max_steps=6, output_dir=str(out),
                                            data_root=str(data_root), verbose=False, progress=False)))
                states.append(load_checkpoint(out / "checkpoint.pt")["model"])
            stated, target, other = states
            assert stated.keys() == target.keys()
            for key in stated:
                assert torch.equal(stated[key], target[key]), (name, cell.id, key)
            assert any(not torch.equal(stated[k], other[k]) for k in stated)  # the comparison can fail
            checked.append(f"{name}:{cell.row}")
    assert "liao2016:psf_p1_nobn_bm" in checked
