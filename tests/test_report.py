"""bioprop.report: renders every figure from run directories in the engine's format, survives missing data."""
from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import bioprop
from bioprop import metrics
from bioprop.report import FIGURE_IDS, TsneFeatures, hidden_features, load_run, train_tsne_features, write_report
from bioprop.report.runs import RunData, label_runs


def write_run(root: Path, rule: str, *, epochs: int = 3, steps_per_epoch: int = 4, analysis: bool = True,
              seed: int = 0) -> Path:
    """A small real training run, logged in the engine's run-directory format (config, metrics.jsonl, final)."""
    out = root / rule
    out.mkdir(parents=True)
    torch.manual_seed(seed)
    net = bioprop.convert(nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                                        nn.Linear(32, 5)), rule, seed=seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    x_all, y_all = torch.randn(256, 12, generator=g), torch.randint(0, 5, (256,), generator=g)
    records, step = [], 0
    for epoch in range(1, epochs + 1):
        for i in range(steps_per_epoch):
            x, y = x_all[i * 64:(i + 1) * 64], y_all[i * 64:(i + 1) * 64]
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            step += 1
            records.append({"kind": "train", "epoch": epoch, "step": step, "loss": loss.item(), "acc": 0.2,
                            "lr": 0.1, "samples_per_s": 1000.0})
            if analysis and step % 2 == 0:
                records.append({"kind": "analysis", "epoch": epoch, "step": step, "time_s": 0.01,
                                "metrics": metrics.training_metrics(net, x, y, F.cross_entropy, bins=12)})
        with torch.no_grad():
            error = 100.0 * float((net(x_all).argmax(1) != y_all).double().mean())
        records.append({"kind": "epoch", "epoch": epoch, "step": step, "train_loss": loss.item(), "train_acc": 0.3,
                        "test_loss": 1.5, "test_acc": 1 - error / 100, "test_top5": 1.0, "test_error": error,
                        "epoch_time_s": 1.0, "lr": 0.1})
    (out / "config.json").write_text(json.dumps({"rule": rule, "model": "mlp", "dataset": "synthetic",
                                                  "epochs": epochs, "seed": seed, "last_layer": ""}))
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    errors = [r["test_error"] for r in records if r["kind"] == "epoch"]
    (out / "final.json").write_text(json.dumps({"rule": rule, "model": "mlp", "dataset": "synthetic",
                                                 "epochs": epochs, "final_test_error": errors[-1],
                                                 "best_test_error": min(errors),
                                                 "alignment": metrics.training_metrics(net)["alignment"]}))
    return out


def figure_bodies(page: str) -> dict[str, str]:
    return dict(re.findall(r'<figure id="fig-([\w-]+)">(.*?)</figure>', page, flags=re.S))


def random_tsne_features() -> dict[str, TsneFeatures]:
    g = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 15)
    return {rule: TsneFeatures(g.normal(size=(60, 8)) + shift * labels[:, None], labels, 3.0)
            for rule, shift in (("backprop", 3.0), ("dfa", 1.0))}


def test_report_contains_every_figure(tmp_path: Path) -> None:
    runs = [write_run(tmp_path, "backprop"), write_run(tmp_path, "usf", seed=1)]
    path = write_report(runs, tmp_path / "report", tsne=random_tsne_features())
    page = path.read_text()
    bodies = figure_bodies(page)
    assert list(bodies) == list(FIGURE_IDS)
    drawn = [f for f in FIGURE_IDS if f != "dfa-signal"]  # no direct-feedback run here
    for fig_id in drawn:
        match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', bodies[fig_id])
        assert match, fig_id
        png = (tmp_path / "report" / f"fig-{fig_id}.png").read_bytes()
        assert base64.b64decode(match.group(1)) == png  # the page embeds exactly the saved file
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.size[0] >= 400 and image.size[1] >= 250
        assert len(png) > 10_000, fig_id  # something was drawn
    assert "No figure" in bodies["dfa-signal"] and "direct feedback" in bodies["dfa-signal"]
    assert not (tmp_path / "report" / "fig-dfa-signal.png").exists()
    # results table: one row per run, final errors from final.json, mean alignment from final.json
    rows = re.findall(r"<tr>(.*?)</tr>", page.split('id="results"')[1].split("</table>")[0])
    assert len(rows) == 3  # header + 2 runs
    final = json.loads((runs[1] / "final.json").read_text())
    cells = re.findall(r"<td>(.*?)</td>", rows[2])
    assert cells[1] == "usf" and cells[5] == f"{final['final_test_error']:.2f}"
    assert cells[7] == f"{np.mean(list(final['alignment'].values())):.1f}"
    assert cells[8] == f"{100 * 6 * 0.01 / 3.0:.1f}"  # 6 analysis records of 0.01 s in 3 epochs of 1 s


def test_report_notes_missing_data_instead_of_failing(tmp_path: Path) -> None:
    bare = write_run(tmp_path, "fa", analysis=False)
    with (bare / "metrics.jsonl").open("a") as fh:
        fh.write('{"kind": "epoch", "epoch": 4, "st')  # a run killed mid-write
    (bare / "final.json").unlink()
    only_config = tmp_path / "empty"
    only_config.mkdir()
    (only_config / "config.json").write_text(json.dumps({"rule": "usf"}))
    page = write_report([bare, only_config], tmp_path / "out").read_text()
    bodies = figure_bodies(page)
    assert list(bodies) == list(FIGURE_IDS)
    assert "<img" in bodies["learning-curves"]
    for fig_id in ("alignment", "kurtosis", "weight-magnitudes", "grad-agreement", "lillicrap", "tsne"):
        assert "No figure" in bodies[fig_id] and "<img" not in bodies[fig_id], fig_id
    assert "analysis records" in bodies["alignment"]
    assert "1 unreadable line(s) in metrics.jsonl were skipped" in page
    assert "final.json is missing" in page and "metrics.jsonl is missing" in page
    with pytest.raises(ValueError, match="does not exist"):
        write_report([tmp_path / "nope"], tmp_path / "out")
    with pytest.raises(ValueError, match="not a run directory"):
        write_report([tmp_path / "out"], tmp_path / "out2")
    with pytest.raises(ValueError, match="at least one run"):
        write_report([], tmp_path / "out")
    (tmp_path / "a_file").write_text("")
    from bioprop.engine.config import ConfigError
    with pytest.raises(ConfigError, match=r"a_file, which is a file; allowed: a path whose parents are directories"):
        write_report([bare], tmp_path / "a_file" / "report")


def test_steps_map_to_fractional_epochs(tmp_path: Path) -> None:
    run = load_run(write_run(tmp_path, "fa", epochs=2, steps_per_epoch=4, analysis=False))
    np.testing.assert_allclose(run.epoch_of([0, 2, 4, 6, 8, 10]), [0, 0.5, 1, 1.5, 2, 2.5])


def test_labels_distinguish_runs(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", "fa", seed=0, epochs=1, analysis=False)
    b = write_run(tmp_path / "b", "fa", seed=1, epochs=1, analysis=False)
    page = write_report([a, b], tmp_path / "out").read_text()
    assert "fa [seed 0]" in page and "fa [seed 1]" in page


def test_labels_name_the_rule_options_and_constraints_that_differ(tmp_path: Path) -> None:
    """Three usf runs that differ in their options and constraints (moskovitz2018's Init., SN and E/I) get three
    names, not three copies of "usf"; given labels replace them."""
    variants = [({"norm": "init"}, []), ({"norm": "sn"}, []), ({"norm": "init"}, ["fixed_sign"])]
    runs = []
    for i, (options, constraints) in enumerate(variants):
        run = write_run(tmp_path / str(i), "usf", epochs=1, analysis=False)
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, "rule_options": options, "constraints": constraints}))
        runs.append(load_run(run))
    label_runs(runs)
    assert [r.label for r in runs] == ["usf [norm=init; no constraints]", "usf [norm=sn; no constraints]",
                                       "usf [norm=init; fixed_sign]"]
    label_runs(runs, ["Init.", "SN", "Init. E/I"])
    assert [r.label for r in runs] == ["Init.", "SN", "Init. E/I"]
    with pytest.raises(ValueError, match="labels: 2 given for 3 runs"):
        label_runs(runs, ["Init.", "SN"])


def test_labels_compare_settings_within_a_rule_and_stay_distinct(tmp_path: Path) -> None:
    """Only the runs of one rule are compared (a lone bp beside two usf variants stays "bp", not "bp [no
    options]"), and names still shared take the shortest distinct end of their path, not "s0" twice."""
    def run_with(folder: Path, rule: str, **settings: object) -> RunData:
        path = write_run(folder, rule, epochs=1, analysis=False)
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **settings}))
        return load_run(path)

    runs = [run_with(tmp_path / "bp", "backprop", rule_options={}),
            run_with(tmp_path / "u1", "usf", rule_options={"norm": "init"}),
            run_with(tmp_path / "u2", "usf", rule_options={"norm": "sn"})]
    label_runs(runs)
    assert [r.label for r in runs] == ["backprop", "usf [norm=init]", "usf [norm=sn]"]
    same = [run_with(tmp_path / column / "bp" / "s0", "backprop") for column in ("mnist", "cifar")]
    same.append(run_with(tmp_path / "mnist" / "fa" / "s0", "fa"))
    label_runs(same)
    assert [r.label for r in same] == ["backprop (mnist/bp/s0/backprop)", "backprop (cifar/bp/s0/backprop)", "fa"]
    label_runs(same, ["BP", "BP", "FA"])  # given labels that repeat are told apart the same way
    assert [r.label for r in same] == ["BP (mnist/bp/s0/backprop)", "BP (cifar/bp/s0/backprop)", "FA"]
    label_runs(same, ["A", "A", "A (mnist/bp/s0/backprop)"])  # a suffix that meets a given label is told apart too
    assert len({r.label for r in same}) == 3
    twice = [load_run(same[2].path), load_run(same[2].path)]
    label_runs(twice)
    assert len({r.label for r in twice}) == 2 and twice[0].label.endswith(" #1)")


def test_hidden_features_are_the_output_layer_input() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3)).train()
    x = torch.randn(50, 6)
    features = hidden_features(net, x, batch_size=16)
    torch.testing.assert_close(features, net[:4](x))
    assert net.training


def test_tsne_nets_train_on_digits() -> None:
    rules = ("backprop", "dfa") if "dfa" in bioprop.list_rules() else ("backprop", "fa")
    features = train_tsne_features("digits", rules, epochs=2, width=32, max_points=200)
    assert list(features) == list(rules)
    for entry in features.values():
        assert entry.features.shape == (200, 32) and entry.labels.shape == (200,)
        assert np.abs(entry.features).max() <= 1.0  # tanh units
        assert entry.test_error < 30.0  # it learned: chance is 90 %


def test_per_layer_figure_of_a_deep_net_has_a_colour_bar_and_no_layer_legend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past 8 layers the lines are told apart by a discrete colour bar of exactly the layers drawn; a legend, if
    any, holds only the reference line (a legend of 21 layers covered the curves)."""
    from types import SimpleNamespace

    from bioprop.report import figures
    series = {f"layer{i}": np.full(3, 10.0 + i) for i in range(21)}
    monkeypatch.setattr(figures, "analysis_series", lambda run, key: (np.arange(1, 4), series))
    fig, note = figures.per_layer([SimpleNamespace(label="usf")], "alignment", title="t", ylabel="angle",
                                  missing="none", reference=(90.0, "90°"))
    assert note == ""
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["90°"]
    bar = fig.axes[1]  # the colour bar's axes
    assert bar.get_ylim() == pytest.approx((-0.5, 20.5))
    fig2, _ = figures.per_layer([SimpleNamespace(label="usf")], "alignment", title="t", ylabel="angle",
                                missing="none")
    assert fig2.axes[0].get_legend() is None and len(fig2.axes) == 2
