"""The training engine: schedules and losses against closed forms, exact resume, atomic checkpoints, NaN stops,
analysis logging and torch.compile with the feedback ops. Everything runs on the 8x8 digits set in seconds."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bioprop
from bioprop.engine import (CheckpointError, ConfigError, TrainConfig, TrainingDiverged, build_loss, config_from_dict,
                            load_checkpoint, lr_factor, read_records, save_checkpoint, train)
from bioprop.engine import checkpoint as checkpoint_module
from bioprop.engine.checkpoint import rng_state, set_rng_state
from bioprop.engine.provenance import code_version

TIMING = ("samples_per_s", "epoch_time_s", "eval_time_s", "time_s")




def small(tmp_path: Path, name: str = "run", **overrides) -> TrainConfig:
    """A digits run of a few seconds: 2x32 tanh MLP, batch 64 (22 steps per epoch)."""
    values = dict(dataset="digits", model="mlp", model_args={"depth": 2, "width": 32}, rule="fa", epochs=2,
                  batch_size=64, lr=0.05, output_dir=str(tmp_path / name), progress=False, verbose=False,
                  log_every=5, metrics_every=0, device="cpu")
    values.update(overrides)
    return config_from_dict(values)


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records if r["kind"] != "event"]


# ------------------------------------------------------------------------------------------- schedule, loss


@pytest.mark.parametrize("schedule, options, reference", [
    ("step", dict(step_size=2, gamma=0.5), lambda opt: torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)),
    ("multistep", dict(milestones=[1, 3], gamma=0.1),
     lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, [1, 3], 0.1)),
])
def test_epoch_schedules_match_torch_schedulers(schedule, options, reference):
    config = TrainConfig(schedule=schedule, lr=0.2, epochs=5, **options)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = reference(opt)
    steps_per_epoch = 7
    for epoch in range(5):
        for k in range(steps_per_epoch):
            step = epoch * steps_per_epoch + k
            assert config.lr * lr_factor(config, step, steps_per_epoch) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()


def test_cosine_per_step_matches_torch_and_warmup_is_linear():
    steps_per_epoch, epochs = 5, 4
    config = TrainConfig(schedule="cosine", lr=0.1, min_lr=0.001, epochs=epochs)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch, eta_min=0.001)
    for step in range(epochs * steps_per_epoch):
        assert config.lr * lr_factor(config, step, steps_per_epoch) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warm = TrainConfig(schedule="none", lr=0.1, warmup_epochs=2, epochs=4)
    assert [lr_factor(warm, s, 5) for s in range(12)] == pytest.approx([(s + 1) / 10 for s in range(10)] + [1, 1])


def test_bce_loss_is_summed_sigmoid_cross_entropy():
    logits = torch.randn(6, 4, dtype=torch.float64)
    target = torch.tensor([0, 3, 1, 1, 2, 0])
    z, t = logits.numpy(), np.eye(4)[target.numpy()]
    p = 1 / (1 + np.exp(-z))
    expected = -(t * np.log(p) + (1 - t) * np.log(1 - p)).sum(axis=1).mean()
    assert build_loss("bce", 4)(logits, target).item() == pytest.approx(expected, rel=1e-6)
    ce = -np.log(np.exp(z)[np.arange(6), target.numpy()] / np.exp(z).sum(1)).mean()
    assert build_loss("ce", 4)(logits, target).item() == pytest.approx(ce, rel=1e-6)


# ------------------------------------------------------------------------------------------- config


def test_config_errors_name_the_key_and_what_is_allowed():
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch'; allowed keys: dataset, .*epochs"):
        config_from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match=r"run.toml: epochs must be an integer, got 'ten' \(str\)"):
        config_from_dict({"epochs": "ten"}, {"epochs": "run.toml"})
    with pytest.raises(ConfigError, match=r"--rule: unknown rule 'xx'; allowed rules: backprop, .*fa"):
        config_from_dict({"rule": "xx"}, {"rule": "--rule"})
    with pytest.raises(ConfigError, match=r"rule_options: rule 'fa' has no option\(s\) 'sclae'"):
        config_from_dict({"rule": "fa", "rule_options": {"sclae": 1.0}})
    with pytest.raises(ConfigError, match=r"unknown optimizer 'lbfgs'; allowed: sgd, adam"):
        config_from_dict({"optimizer": "lbfgs"})
    with pytest.raises(ConfigError, match="unknown dataset 'mnsit'; allowed: .*digits"):
        config_from_dict({"dataset": "mnsit"})
    assert config_from_dict({"lr": 1, "rule": "sign_symmetry"}).lr == 1.0  # int accepted for float, alias resolved
    assert config_from_dict({"rule": "sign_symmetry"}).rule == "usf"


# ------------------------------------------------------------------------------------------- run directory


def test_run_writes_the_documented_layout(tmp_path):
    summary = train(small(tmp_path, epochs=2))
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "checkpoint.prev.pt", "checkpoint.pt", "config.json",
                                                     "final.json", "metrics.jsonl"]  # no run.lock left behind
    assert load_checkpoint(out / "checkpoint.prev.pt")["epoch"] == 1
    saved = json.loads((out / "config.json").read_text())
    assert saved.pop("code") == code_version()  # which code made the run (see the provenance tests)
    assert saved == small(tmp_path, epochs=2).to_dict()
    epochs = read_records(out / "metrics.jsonl", "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2] and [r["step"] for r in epochs] == [22, 44]
    for r in epochs:
        assert r["test_error"] == pytest.approx(100 * (1 - r["test_acc"]))
        assert r["test_acc"] <= r["test_top5"] <= 1
    trains = read_records(out / "metrics.jsonl", "train")
    assert [r["step"] for r in trains] == list(range(5, 45, 5))
    final = json.loads((out / "final.json").read_text())
    assert final["final_test_error"] == pytest.approx(epochs[-1]["test_error"])
    assert final == json.loads(json.dumps(summary))
    # the final alignment is the W-vs-B angle of each converted layer, recomputed from the saved weights
    model = bioprop.models.create_model("mlp", num_classes=10, in_channels=1, image_size=8, depth=2, width=32)
    model = bioprop.convert(model, "fa", seed=0)
    model.load_state_dict(load_checkpoint(out / "checkpoint.pt")["model"])
    assert final["alignment"] == pytest.approx(bioprop.metrics.alignment(model))


def test_evaluation_matches_an_independent_pass(tmp_path):
    train(small(tmp_path, epochs=1))
    out = tmp_path / "run"
    model = bioprop.convert(bioprop.models.create_model("mlp", num_classes=10, in_channels=1, image_size=8,
                                                        depth=2, width=32), "fa", seed=0)
    model.load_state_dict(load_checkpoint(out / "checkpoint.pt")["model"])
    test = bioprop.data.load_dataset("digits", split="test")
    x = (test.images.float() / 255 - test.mean[0]) / test.std[0]
    with torch.no_grad():
        logits = model.eval()(x)
    top1 = (logits.argmax(1) == test.labels).double().mean().item()
    top5 = (logits.topk(5, 1).indices == test.labels[:, None]).any(1).double().mean().item()
    record = read_records(out / "metrics.jsonl", "epoch")[-1]
    assert record["test_acc"] == pytest.approx(top1) and record["test_top5"] == pytest.approx(top5)
    assert record["test_loss"] == pytest.approx(nn.functional.cross_entropy(logits, test.labels).item(), rel=1e-5)


def test_existing_run_is_never_overwritten_by_accident(tmp_path):
    train(small(tmp_path, epochs=1))
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*--overwrite"):
        train(small(tmp_path, epochs=1))
    with pytest.raises(ConfigError, match="other settings.*lr: checkpoint 0.05, now 0.1"):
        train(small(tmp_path, epochs=2, lr=0.1, resume=True))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        train(small(tmp_path, "empty", resume=True))


# ------------------------------------------------------------------------------------------- resume


class Killed(Exception):
    pass


def assert_resumed_equals_uninterrupted(uninterrupted: Path, killed: Path) -> list[dict]:
    """The killed and resumed run in ``killed`` ends with the weights, momentum and log of ``uninterrupted``, and
    its log holds one event, the resume; returns that log."""
    a = load_checkpoint(uninterrupted / "checkpoint.pt")
    b = load_checkpoint(killed / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    log_a = read_records(uninterrupted / "metrics.jsonl")
    log_b = read_records(killed / "metrics.jsonl")
    assert without_timing(log_a) == without_timing(log_b)
    assert [r["event"] for r in log_b if r["kind"] == "event"] == ["resume"]
    return log_b


@pytest.mark.parametrize("kill_at", [30, 44])  # mid-epoch 2, and right after epoch 2's last step
def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path, kill_at):
    # dropout, momentum and a cosine schedule: every piece of state and randomness must come back exactly
    options = dict(epochs=3, rule="usf", model_args={"depth": 2, "width": 32, "dropout_hidden": 0.2},
                   schedule="cosine", optimizer="sgd", momentum=0.9)
    reference = train(small(tmp_path, "uninterrupted", **options))

    def kill(info):
        if info.step == kill_at:
            raise Killed

    with pytest.raises(Killed):
        train(small(tmp_path, "killed", **options), on_step=kill)
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["epoch"] == 1
    resumed = train(small(tmp_path, "killed", resume=True, **options))

    assert_resumed_equals_uninterrupted(tmp_path / "uninterrupted", tmp_path / "killed")
    assert resumed["final_test_error"] == reference["final_test_error"]


def test_resume_continues_with_more_epochs_and_constraints(tmp_path):
    options = dict(rule="usf", optimizer="bm", lr=0.002, constraints=["fixed_sign", "constant_norm"])
    train(small(tmp_path, "full", epochs=2, **options))
    train(small(tmp_path, "split", epochs=1, **options))
    train(small(tmp_path, "split", epochs=2, resume=True, **options))
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["constraints"].keys() == {"fixed_sign", "constant_norm"}


# ------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_loads_with_weights_only_and_restores_rng(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    state = rng_state()
    path = save_checkpoint({"rng": state, "config": TrainConfig().to_dict()}, tmp_path / "c.pt")
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())
    torch.manual_seed(99)
    np.random.seed(99)
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    again = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


def test_a_crash_while_saving_never_replaces_a_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"w": torch.arange(4.0)}, path)
    good = path.read_bytes()

    def crash(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 half a zip")  # the first bytes of a checkpoint, then the process dies
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"w": torch.zeros(4)}, path)
    assert path.read_bytes() == good
    assert not path.with_name("checkpoint.pt.tmp").exists()
    # a kill -9 leaves the truncated temp file behind; it is never read, and the next save replaces it
    path.with_name("checkpoint.pt.tmp").write_bytes(b"PK\x03\x04 truncated")
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(4.0))
    monkeypatch.undo()
    save_checkpoint({"w": torch.ones(4)}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(4))
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_kill_during_the_epoch_checkpoint_resumes_from_the_previous_one(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_save = checkpoint_module.torch.save

    def save_then_die(obj, fh, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 1 wrote best.pt and checkpoint.pt; die in the middle of epoch 2's best.pt
            fh.write(b"PK\x03\x04")
            raise Killed
        real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_then_die)
    with pytest.raises(Killed):
        train(small(tmp_path, "killed", epochs=2))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["epoch"] == 1
    train(small(tmp_path, "killed", epochs=2, resume=True))
    train(small(tmp_path, "uninterrupted", epochs=2))
    a = load_checkpoint(tmp_path / "uninterrupted" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------- divergence


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    def poison(info):
        if info.epoch == 2 and info.step == 30:
            with torch.no_grad():
                next(info.model.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"training diverged in epoch 2: the loss became nan between steps "
                                               r"\d+ and \d+; the last good checkpoint \(epoch 1\) is kept"):
        train(small(tmp_path, epochs=3), on_step=poison)
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())
    events = read_records(tmp_path / "run" / "metrics.jsonl", "event")
    assert events[-1]["event"] == "nan" and "diverged" in events[-1]["message"]


def test_huge_learning_rate_diverges(tmp_path):
    with pytest.raises(TrainingDiverged, match="diverged in epoch 1.*no checkpoint was written yet"):
        train(small(tmp_path, rule="backprop", lr=1e12, momentum=0.0, model_args={"activation": "relu"}))


# ------------------------------------------------------------------------------------------- analysis log


def test_training_metrics_are_logged_every_n_steps_with_their_cost(tmp_path, monkeypatch):
    seen = []

    def fake_metrics(model, x, y, loss_fn):
        seen.append((x.shape, loss_fn(model(x), y).item()))
        return {"alignment": {"layer": torch.tensor(45.0)}}

    monkeypatch.setattr(bioprop.metrics, "training_metrics", fake_metrics, raising=False)
    train(small(tmp_path, epochs=2, metrics_every=10))
    records = read_records(tmp_path / "run" / "metrics.jsonl", "analysis")
    # every metrics_every steps and at the end of every epoch (22 steps each)
    assert [r["step"] for r in records] == [10, 20, 22, 30, 40, 44]
    assert [r["epoch"] for r in records] == [1, 1, 1, 2, 2, 2]
    summary = {"alignment": {"mean": 45.0, "min": 45.0, "max": 45.0, "layers": 1}}
    assert all(r["summary"] == summary and "metrics" not in r and r["time_s"] >= 0 for r in records)
    layers = read_records(tmp_path / "run" / "metrics_layers.jsonl", "analysis")
    assert [(r["epoch"], r["step"]) for r in layers] == [(r["epoch"], r["step"]) for r in records]
    assert all(r["metrics"] == {"alignment": {"layer": 45.0}} for r in layers)
    assert all(shape == (64, 1, 8, 8) and math.isfinite(loss) for shape, loss in seen)


# ------------------------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("rule", ["fa", "usf"])
def test_compiled_converted_mlp_gives_the_eager_gradients(rule):
    torch.manual_seed(0)
    net = bioprop.convert(nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                                        nn.Linear(16, 3)), rule, seed=0)
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))
    nn.functional.cross_entropy(net(x), y).backward()
    eager = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    compiled = torch.compile(net, backend="inductor", fullgraph=False)
    nn.functional.cross_entropy(compiled(x), y).backward()
    for name, param in net.named_parameters():
        torch.testing.assert_close(param.grad, eager[name], rtol=1e-5, atol=1e-6)
    # the feedback path really is used: plain autograd would give different hidden-layer gradients
    reference = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    plain_state = {k: v for k, v in net.state_dict().items() if not k.split(".")[-1].startswith("feedback")}
    reference.load_state_dict(plain_state)
    nn.functional.cross_entropy(reference(x), y).backward()
    assert not torch.allclose(reference[0].weight.grad, eager["0.weight"])


# ------------------------------------------------------------------------------------------- speed options


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path / "checkpoint.pt")["model"]


def test_compile_and_channels_last_train_like_eager(tmp_path):
    # a conv net so that channels_last changes the memory layout of real convolutions
    options = dict(model="small_convnet", model_args={}, rule="usf", epochs=1, batch_size=128, log_every=0)
    train(small(tmp_path, "eager", **options))
    train(small(tmp_path, "fast", compile=True, channels_last=True, **options))
    eager, fast = _weights(tmp_path / "eager"), _weights(tmp_path / "fast")
    for key in eager:
        torch.testing.assert_close(fast[key], eager[key], rtol=1e-3, atol=1e-4, msg=key)


def test_amp_runs_the_forward_in_bfloat16(tmp_path, monkeypatch):
    seen = []
    real_linear = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        out = real_linear(x, weight, bias)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    train(small(tmp_path, "amp", rule="backprop", epochs=1, amp=True))
    assert torch.bfloat16 in seen
    record = read_records(tmp_path / "amp" / "metrics.jsonl", "epoch")[-1]
    assert math.isfinite(record["test_loss"]) and record["test_error"] < 60


def test_tensorboard_is_optional_and_its_absence_is_a_clear_error(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="tensorboard = true needs the tensorboard package: pip install"):
            small(tmp_path, epochs=1, tensorboard=True)  # refused when the config is checked, before any work
        return
    train(small(tmp_path, epochs=1, tensorboard=True))
    assert any((tmp_path / "run" / "tensorboard").iterdir())


@pytest.mark.parametrize("rule", bioprop.list_rules())
def test_every_rule_trains_and_resumes_exactly(tmp_path, rule):
    # per-rule state (fixed B, brsf's redraw counter, kp's learned B, wm's mirrored B, DFA's D) must all live in
    # the checkpoint for a resumed run to match
    options = dict(rule=rule, model_args={"depth": 2, "width": 16}, log_every=0)
    train(small(tmp_path, "full", epochs=2, **options))
    train(small(tmp_path, "split", epochs=1, **options))
    train(small(tmp_path, "split", epochs=2, resume=True, **options))
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    errors = [r["test_error"] for r in read_records(tmp_path / "full" / "metrics.jsonl", "epoch")]
    assert errors[-1] < 80  # it learns: chance is 90 %


# ------------------------------------------------------------------------------------------- max_steps


def test_max_steps_caps_every_epoch_and_the_schedule_follows(tmp_path):
    options = dict(epochs=3, max_steps=5, schedule="multistep", milestones=[1, 2], gamma=0.1, log_every=1)
    summary = train(small(tmp_path, "capped", **options))
    assert summary["steps"] == 15 and summary["epochs"] == 3
    records = read_records(tmp_path / "capped" / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "epoch"] == [5, 10, 15]
    # multistep counts epochs of 5 steps: lr 0.05 for steps 1-5, 0.005 for 6-10, 0.0005 for 11-15
    lrs = {r["step"]: r["lr"] for r in records if r["kind"] == "train"}
    for step, factor in ((1, 1.0), (5, 1.0), (6, 0.1), (10, 0.1), (11, 0.01), (15, 0.01)):
        assert lrs[step] == pytest.approx(0.05 * factor), step
    # a cap at or above the epoch's 22 batches changes nothing, bit for bit
    full = load_checkpoint(Path(train(small(tmp_path, "plain", epochs=1))["output_dir"]) / "checkpoint.pt")
    same = load_checkpoint(Path(train(small(tmp_path, "cap22", epochs=1, max_steps=22))["output_dir"])
                           / "checkpoint.pt")
    for key in full["model"]:
        assert torch.equal(full["model"][key], same["model"][key]), key


def test_max_steps_run_resumes_exactly_after_a_kill(tmp_path):
    options = dict(epochs=3, max_steps=4, schedule="cosine")
    reference = train(small(tmp_path, "whole", **options))

    def kill(info):
        if info.step == 6:  # mid-epoch 2
            raise Killed

    with pytest.raises(Killed):
        train(small(tmp_path, "killed", **options), on_step=kill)
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["step"] == 4
    resumed = train(small(tmp_path, "killed", resume=True, **options))
    assert resumed["steps"] == reference["steps"] == 12
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["final_test_error"] == reference["final_test_error"]


# ------------------------------------------------------------------------------------------- seeds, JSON


def test_epoch_and_loader_seeds_come_from_derive_seed_and_keep_their_former_values():
    """Both go through bioprop.seeding.derive_seed; the reference is the SeedSequence formula each used before."""
    from bioprop.data.loader import _generator
    from bioprop.engine.pipeline import epoch_seed
    for parts in [(0, 1, 0), (7, 3, 1), (2**63 + 5, 12, 3), (123456789, 0, 2)]:
        assert epoch_seed(*parts) == int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
        former = int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0])
        assert torch.equal(torch.randperm(50, generator=_generator(*parts)),
                           torch.randperm(50, generator=torch.Generator().manual_seed(former)))


def test_one_jsonable_serves_the_run_logs_and_the_metrics():
    from bioprop import metrics
    from bioprop.engine import runlog
    assert runlog.jsonable is metrics.jsonable
    value = {"t": torch.tensor([1.0, float("nan")]), "s": np.float32(np.inf), "a": np.array([[1, 2]]),
             "n": (np.int64(3), torch.tensor(2.5)), 4: float("-inf")}
    assert metrics.jsonable(value) == {"t": [1.0, None], "s": None, "a": [[1, 2]], "n": [3, 2.5], "4": None}


# ------------------------------------------------------------------------------------------- tasks


def test_a_registered_task_is_run_by_train_and_named_in_the_unknown_task_error(tmp_path, monkeypatch):
    """train() finds the run through the task registry: a new task needs no change to the loop."""
    import copy
    from bioprop.engine import tasks as tasks_module
    from bioprop.engine.classification import ClassificationTask
    monkeypatch.setattr(tasks_module, "TASKS", copy.deepcopy(tasks_module.TASKS))  # leave the real registry alone
    from bioprop.engine import config as config_module, loop as loop_module
    monkeypatch.setattr(config_module, "TASKS", tasks_module.TASKS)
    calls = []

    class EchoRun:
        def __init__(self, config, env, device, on_step, task):
            calls.append((config.task, type(task).__name__, env.world_size))

        def run(self):
            return {"task": "echo"}

    @tasks_module.register_task("echo", description="a test task that trains nothing")
    class EchoTask(ClassificationTask):
        """A test task."""
        run_class = EchoRun

    assert tasks_module.list_tasks() == ["classification", "detection", "echo"]
    assert dict(tasks_module.describe_tasks())["echo"] == "a test task that trains nothing"
    assert train(small(tmp_path, task="echo")) == {"task": "echo"}
    assert calls == [("echo", "EchoTask", 1)]
    assert loop_module.create_task is tasks_module.create_task  # the loop looks the task up, it names none
    with pytest.raises(ConfigError, match=r"unknown task 'nope'; allowed: classification, detection, echo"):
        train(small(tmp_path, task="nope"))


# ------------------------------------------------------------------------------------------- provenance


def _git(cwd: Path, *args: str) -> str:
    import subprocess
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_config_and_final_json_name_the_code_that_made_the_run(tmp_path):
    summary = train(small(tmp_path, epochs=1))
    out = tmp_path / "run"
    package = Path(bioprop.__file__).resolve().parent
    expected = {"version": bioprop.__version__, "commit": None, "dirty": None}
    try:
        _git(package, "ls-files", "--error-unmatch", "__init__.py")
    except Exception:  # noqa: BLE001 - an installed copy: no git facts
        pass
    else:  # the reference: git itself, asked directly
        expected["commit"] = _git(package, "rev-parse", "HEAD")
        expected["dirty"] = bool(_git(package, "status", "--porcelain", "--", "."))
    for name in ("config.json", "final.json"):
        assert json.loads((out / name).read_text())["code"] == expected, name
    assert summary["code"] == expected


def test_a_resumed_run_keeps_the_code_it_began_with_and_its_resume_event_names_the_new_code(tmp_path, monkeypatch):
    from bioprop.engine import loop
    out = tmp_path / "run"
    first = {"version": "0.0.1", "commit": "a" * 40, "dirty": False}
    monkeypatch.setattr(loop, "code_version", lambda: dict(first))
    train(small(tmp_path, epochs=1))
    later = {"version": "0.0.2", "commit": "b" * 40, "dirty": True}
    monkeypatch.setattr(loop, "code_version", lambda: dict(later))
    summary = train(small(tmp_path, epochs=2, resume=True))
    assert json.loads((out / "config.json").read_text())["code"] == first
    resumes = [r for r in read_records(out / "metrics.jsonl") if r.get("event") == "resume"]
    assert [r["code"] for r in resumes] == [later]
    assert summary["code"] == later == json.loads((out / "final.json").read_text())["code"]
    (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()), "code": None}))
    train(small(tmp_path, epochs=3, resume=True))  # a config.json without code: the resuming code stands in
    assert json.loads((out / "config.json").read_text())["code"] == later


def test_code_version_outside_a_checkout_and_in_a_dirty_one(tmp_path, monkeypatch):
    import subprocess
    from bioprop.engine import provenance
    monkeypatch.setattr(provenance, "_PACKAGE_DIR", tmp_path)
    provenance._git_state.cache_clear()
    try:
        assert provenance.code_version() == {"version": bioprop.__version__, "commit": None, "dirty": None}
        repo = tmp_path / "repo"
        (repo / "pkg").mkdir(parents=True)
        (repo / "pkg" / "__init__.py").write_text("x = 1\n")
        for args in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]):
            subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
        monkeypatch.setattr(provenance, "_PACKAGE_DIR", repo / "pkg")
        provenance._git_state.cache_clear()
        clean = provenance.code_version()
        assert clean["commit"] == _git(repo, "rev-parse", "HEAD") and len(clean["commit"]) == 40
        assert clean["dirty"] is False
        (repo / "pkg" / "__init__.py").write_text("x = 2\n")
        provenance._git_state.cache_clear()
        assert provenance.code_version()["dirty"] is True
    finally:
        provenance._git_state.cache_clear()


def test_the_loop_names_no_task():
    """The loop reaches every task through the registry: it imports no task module and compares no task name."""
    import ast
    from bioprop.engine import loop, tasks
    tree = ast.parse(Path(loop.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"classification", "..detection", "detection", "..detection.engine"}
    names = set(tasks.list_tasks())
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert not names & strings


def test_every_task_defines_the_loop_parts_or_runs_itself():
    """The Task base declares what the loop calls; a registered task trained by the loop defines all of it, and a
    task without a part fails with one line naming it."""
    from bioprop.engine import tasks as tasks_module
    from bioprop.engine.classification import ClassificationTask
    from bioprop.engine.evaluation import RunningSums
    assert tasks_module.Task.LOOP_PARTS == ("loss", "forward", "new_window", "evaluate", "skipped_evaluation",
                                            "analysis")
    assert tasks_module.Task.RESULT_PARTS == ("history_entry", "new_best", "better", "summary", "epoch_line")
    for name in tasks_module.list_tasks():
        cls = tasks_module.TASKS.get(name)
        if cls.run_class is None:
            missing = [p for p in cls.LOOP_PARTS + cls.RESULT_PARTS if getattr(cls, p) is getattr(tasks_module.Task, p)]
            assert not missing, f"task {name!r} is trained by the loop but does not define {missing}"
    # both built-in tasks are trained by the loop (detection had a run class of its own before)
    assert tasks_module.TASKS.get("detection").run_class is None
    assert tasks_module.TASKS.get("classification").run_class is None
    window = ClassificationTask().new_window(torch.device("cpu"), 4)
    assert isinstance(window, RunningSums) and window.first_step == 5 and window.count == 0

    class Bare(tasks_module.Task):
        def dataset_names(self):
            return []

        def model_names(self):
            return []

        def build_data(self, config, env, device):
            raise AssertionError

    for part in tasks_module.Task.LOOP_PARTS + tasks_module.Task.RESULT_PARTS:
        with pytest.raises(NotImplementedError, match=rf"^task 'Bare' does not define {part}\(\), which the engine's"):
            method = getattr(Bare(), part)
            method(*[None] * (method.__code__.co_argcount - 1))
