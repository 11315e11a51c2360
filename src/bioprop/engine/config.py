"""``TrainConfig``: every option of a training run, with its default, its type and its check.

A run's config is built in layers, each overriding the one before: the defaults below, a TOML file
(``--config``), the command-line flags, then ``--set key=value`` overrides (dotted keys reach into
``model_args`` and ``rule_options``). Every value is checked against the field's type and allowed values, and
an error names the key, where its value came from and what is allowed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from ..optim import resolve_constraint_name
from ..registry import Registry
from ..rules import create_rule, resolve_rule_name, rule_options
from .build import DEFAULT_MOMENTUM, LOSSES, OPTIMIZERS, SCHEDULES
from .tasks import TASKS

__all__ = ["TrainConfig", "ConfigError", "config_from_dict", "load_toml", "parse_override", "apply_override",
           "OPTIMIZERS", "SCHEDULES", "LOSSES", "TASKS", "DEFAULT_MOMENTUM", "RESUMABLE_CHANGES", "as_toml"]


#: options that may differ between an interrupted run and its resumption; every other one must match
RESUMABLE_CHANGES = frozenset({"resume", "overwrite", "epochs", "progress", "verbose", "tensorboard", "num_workers",
                               "data_root", "device", "eval_every", "log_every", "metrics_every",
                               "output_dir"})  # the run directory is where the checkpoint is, not a setting


@dataclass
class TrainConfig:
    """A training run. Every field is a primitive (str, int, float, bool, list, dict) so the config is written
    as JSON, read back from TOML and stored inside a ``weights_only`` checkpoint unchanged."""

    # --- data
    dataset: str = "digits"  # a name from bioprop.data.list_datasets()
    data_root: str = ""  # where data sets live; "" = $BIOPROP_DATA or ~/.cache/bioprop
    val_size: int = 0  # > 0: hold out this many training images as a validation split (best.pt follows it)
    augment: str = "auto"  # "auto" (the data set's standard augmentation), "on" or "off"
    num_workers: int = 0  # loader worker processes (only file-backed sets such as imagefolder use them)
    task: str = "classification"  # classification | detection (COCO-format data, RetinaNet, AP; docs/detection.md)
    # --- model and learning rule
    model: str = "mlp"  # a name from bioprop.models.list_models()
    model_args: dict = field(default_factory=dict)  # keyword arguments of the model, e.g. {depth = 2, width = 800}
    rule: str = "backprop"  # a name from bioprop.list_rules()
    rule_options: dict = field(default_factory=dict)  # options of the rule, e.g. {scale = "biotorch"}
    last_layer: str = ""  # rule of the output layer, e.g. "backprop" (xiao2018); "" = same rule as the others
    constraints: list = field(default_factory=list)  # applied after every step: "constant_norm", "fixed_sign"
    # --- optimisation
    epochs: int = 10
    max_steps: int = 0  # > 0: end every epoch after this many optimizer steps (smoke runs); 0 = the whole set
    batch_size: int = 64  # global batch; under DDP each of the N processes takes batch_size / N
    lr: float = 0.01  # peak learning rate (after warmup)
    optimizer: str = "sgd"  # sgd | adam | adamw | rmsprop | bm (Batch Manhattan, liao2016)
    momentum: float | None = None  # sgd, rmsprop and bm momentum; None = the optimizer's own (DEFAULT_MOMENTUM)
    weight_decay: float = 0.0
    bm_plain_last_layer: bool = False  # bm only: the output layer takes plain SGD steps (xiao2018's option)
    schedule: str = "none"  # none | step | multistep | cosine (functions of the step) | halve_on_plateau
    step_size: int = 30  # step: multiply the lr by gamma every step_size epochs
    milestones: list = field(default_factory=list)  # multistep: epochs at which the lr is multiplied by gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warmup from 0 over this many epochs (fractions allowed)
    min_lr: float = 0.0  # cosine: the lr at the last step
    plateau_halvings: int = 8  # halve_on_plateau: stop after this many halvings of the lr
    plateau_stop_error: float = 0.01  # halve_on_plateau: stop once the smoothed train error (%) is at or below it
    plateau_smoothing: float = 0.75  # halve_on_plateau: m <- s*m + (1-s)*err, s in [0, 1)
    loss: str = "ce"  # ce (softmax cross-entropy) | bce (sigmoid outputs, one-hot targets; nokland2016)
    # --- speed
    device: str = "auto"  # auto (cuda if present, else cpu), cpu, cuda, cuda:N
    amp: bool = False  # bf16 autocast for the forward pass and the loss
    channels_last: bool = False  # channels-last memory format for 4-d inputs and weights
    compile: bool = False  # torch.compile the model (works with every feedback op)
    # --- reproducibility and output
    seed: int = 0  # seeds weights, feedback matrices, data order, augmentation and dropout
    deterministic: bool = False  # also ask torch for deterministic kernels (slower on GPU; CPU already is)
    output_dir: str = ""  # "" = runs/<dataset>-<model>-<rule>-s<seed>[-<hash of the other changed settings>]
    resume: bool = False  # continue the run in output_dir from its checkpoint.pt
    overwrite: bool = False  # start over in an output_dir that already holds a run
    eval_every: int = 1  # evaluate every N epochs (and always after the last one)
    log_every: int = 50  # write a "train" record every N optimizer steps (0 = never)
    metrics_every: int = 200  # run bioprop.metrics.training_metrics every N steps (0 = never); about 2-3% of the time
    divergence_factor: float = 1e3  # stop when a logged loss exceeds this × the run's first one (0 = never)
    divergence_action: str = "stop"  # "stop" (as for NaN, the last good checkpoint is kept) or "warn" (once)
    progress: bool = True  # tqdm progress bar (only shown on a terminal)
    verbose: bool = True  # print one summary line per epoch
    tensorboard: bool = False  # also write TensorBoard scalars to <output_dir>/tensorboard

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON/TOML-compatible values."""
        return dataclasses.asdict(self)

    def resolved_output_dir(self) -> Path:
        """The run directory: ``output_dir``, or ``runs/<dataset>-<model>-<rule>-s<seed>`` followed by
        ``-<8 hex digits>``, a hash of the other settings that differ from the defaults (none: no suffix), so
        that runs with other learning rates, models options, ... get directories of their own. Settings that
        may change on resume (epochs, logging, device, ...) are not part of the hash."""
        if self.output_dir:
            return Path(self.output_dir)
        name = f"{self.dataset}-{self.model}-{self.rule}-s{self.seed}"
        changed = settings_hash(self)
        return Path("runs") / (f"{name}-{changed}" if changed else name)


class ConfigError(ValueError):
    """A bad config key or value; the message is one line that names the key and what is allowed.

    Attributes:
        key: the offending key (its top-level name), or "" for the file as a whole.
        reason: what is wrong and what is allowed (it names the key itself).
        source: where the value came from (``"--rule"``, ``"run.toml"``, ``"--set lr=x"`` ...), or "".
    """

    def __init__(self, key: str, reason: str, source: str = "") -> None:
        self.key, self.reason, self.source = key, reason, source
        super().__init__(f"{source}: {reason}" if source else reason)

    def __reduce__(self) -> tuple[Any, ...]:  # pickled across DDP ranks (engine.distributed.first_error)
        return (ConfigError, (self.key, self.reason, self.source))

    def with_source(self, source: str) -> "ConfigError":
        """The same error, attributed to ``source`` (unchanged when ``source`` is empty)."""
        return ConfigError(self.key, self.reason, source or self.source)


def settings_hash(config: TrainConfig) -> str:
    """8 hex digits of sha256 over the settings that differ from the defaults, leaving out those already in the
    default directory name and those that may change on resume; "" when there are none."""
    skip = RESUMABLE_CHANGES | {"dataset", "model", "rule", "seed"}
    defaults, values = TrainConfig().to_dict(), config.to_dict()
    changed = {k: v for k, v in values.items() if k not in skip and v != defaults[k]}
    if not changed:
        return ""
    return hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]


def rule_options_of(config: TrainConfig) -> dict[str, Any]:
    """``config.rule_options`` as the rule takes them: ``"none"`` (which TOML and ``--set`` can write) becomes
    None for an option whose default is None (e.g. ``norm``)."""
    defaults = rule_options(config.rule)
    return {k: (None if isinstance(v, str) and v.lower() == "none" and k in defaults and defaults[k] is None
                else v) for k, v in config.rule_options.items()}


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def allowed_keys() -> str:
    """The config keys, comma-separated, for error messages."""
    return ", ".join(FIELDS)


def _type_name(hint: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table",
            list: "a list"}.get(hint, str(hint))


def check_type(key: str, value: Any) -> Any:
    """``value`` converted to the type of field ``key`` (an int is accepted for a float field).

    Raises:
        ConfigError: unknown key (listing the keys) or a value of the wrong type (naming the expected one).
    """
    if key not in FIELDS:
        raise ConfigError(key, f"unknown config key {key!r}; allowed keys: {allowed_keys()}")
    hint = _HINTS[key]
    if type(None) in typing.get_args(hint):  # an optional field: None means "its default, resolved later"
        if value is None:
            return None
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    ok = False
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif hint is dict:
        ok = isinstance(value, Mapping)
        value = dict(value) if ok else value
    elif hint is list:
        if isinstance(value, str) and key == "constraints":
            value = [v for v in value.split(",") if v.strip()]  # "--set constraints=fixed_sign,constant_norm"
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    if not ok:
        raise ConfigError(key, f"{key} must be {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    return value


#: the largest finite float32: a larger lr or decay cannot be applied to float32 weights
FLOAT32_MAX = 3.4028234663852886e38


def check_values(config: TrainConfig) -> None:
    """Check each value against what it may be (names against the registries, numbers against their ranges).

    Raises:
        ConfigError: naming the key and the allowed values.
    """
    def choice(key: str, allowed: tuple[str, ...] | Registry) -> None:
        value = getattr(config, key)
        if isinstance(allowed, Registry):  # the registry's canonical name, or its one-line unknown-name error
            try:
                setattr(config, key, allowed.resolve(value))
            except (TypeError, ValueError) as err:
                raise ConfigError(key, str(err)) from None
        elif value not in allowed:
            raise ConfigError(key, f"unknown {key} {value!r}; allowed: {', '.join(allowed)}")

    def positive(key: str, zero_ok: bool = False) -> None:
        value = getattr(config, key)
        if not (value >= 0 if zero_ok else value > 0):
            raise ConfigError(key, f"{key} must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")
        if isinstance(value, float) and not value <= FLOAT32_MAX:  # inf, or a step torch cannot apply
            raise ConfigError(key, f"{key} must be finite and at most {FLOAT32_MAX:.4g} (what a float32 holds), "
                                   f"got {value!r}")

    for key in ("epochs", "batch_size", "eval_every", "step_size", "plateau_halvings"):
        positive(key)
    choice("optimizer", OPTIMIZERS)
    if config.momentum is None:
        config.momentum = DEFAULT_MOMENTUM[config.optimizer]
    for key in ("max_steps", "lr", "momentum", "weight_decay", "val_size", "num_workers", "warmup_epochs", "min_lr",
                "log_every", "metrics_every", "gamma", "plateau_stop_error"):
        positive(key, zero_ok=True)
    if not 0.0 <= config.plateau_smoothing < 1.0:
        raise ConfigError("plateau_smoothing", f"plateau_smoothing must be in [0, 1), got {config.plateau_smoothing!r}")
    choice("schedule", SCHEDULES)
    choice("divergence_action", ("stop", "warn"))
    if config.divergence_factor != 0 and not config.divergence_factor > 1:
        raise ConfigError("divergence_factor", f"divergence_factor must be 0 (never stop) or > 1, got "
                                               f"{config.divergence_factor!r}")
    choice("loss", LOSSES)
    choice("augment", ("auto", "on", "off"))
    choice("task", TASKS)
    if not (config.device in ("auto", "cpu", "cuda") or config.device.startswith("cuda:")):
        raise ConfigError("device", f"unknown device {config.device!r}; allowed: auto, cpu, cuda, cuda:N")
    if any(isinstance(m, bool) or not isinstance(m, int) or m < 0 for m in config.milestones):
        raise ConfigError("milestones", f"milestones must be a list of epochs (integers >= 0), got "
                                        f"{config.milestones!r}")
    if config.milestones != sorted(config.milestones):
        raise ConfigError("milestones", f"milestones must be increasing, got {config.milestones!r}")
    if config.schedule == "multistep" and not config.milestones:
        raise ConfigError("milestones", "schedule 'multistep' needs milestones, e.g. milestones = [50, 75]")
    if isinstance(config.seed, bool) or not 0 <= config.seed < 2**64:
        raise ConfigError("seed", f"seed must be an integer in 0 .. 2**64-1 (it seeds torch's 64-bit generator), "
                                  f"got {config.seed!r}")
    if config.resume and config.overwrite:
        raise ConfigError("resume", "resume and overwrite exclude each other; pick one")
    try:
        config.rule = resolve_rule_name(config.rule)
    except ValueError as err:
        raise ConfigError("rule", str(err)) from None
    try:
        rule = create_rule(config.rule, **rule_options_of(config))
    except (TypeError, ValueError) as err:
        raise ConfigError("rule_options", f"rule_options: {err}") from None
    if config.constraints and getattr(rule, "learns_feedback", False):
        raise ConfigError("constraints", f"constraints: rule {config.rule!r} keeps B tied to W's optimizer steps, "
                                         "and a constraint changes W outside the optimizer (B would move with it); "
                                         "allowed: no constraints with this rule")
    if config.last_layer:
        try:
            config.last_layer = resolve_rule_name(config.last_layer)
        except ValueError as err:
            raise ConfigError("last_layer", f"last_layer: {err}") from None
    for name in config.constraints:
        try:
            resolve_constraint_name(name)
        except ValueError as error:
            raise ConfigError("constraints", str(error)) from None
    if config.tensorboard:
        import importlib.util
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("tensorboard", "tensorboard = true needs the tensorboard package: pip install "
                                             "tensorboard")
    task = TASKS.create(config.task)
    _check_name("dataset", config.dataset, task.dataset_names(), config.task)
    _check_name("model", config.model, task.model_names(), config.task)


def _check_name(key: str, value: str, names: list[str], task: str) -> None:
    if value not in names:
        what = f"{task} {key}" if task != "classification" else key
        raise ConfigError(key, f"unknown {what} {value!r}; allowed: {', '.join(names)}")


def config_from_dict(values: Mapping[str, Any], sources: Mapping[str, str] | None = None,
                     base: TrainConfig | None = None) -> TrainConfig:
    """A checked :class:`TrainConfig` from ``values`` laid over ``base`` (default: the defaults).

    Args:
        values: ``{key: value}``; unknown keys and wrong types are errors.
        sources: ``{key: where the value came from}`` for error messages (e.g. ``{"rule": "--rule"}``).
        base: the config to start from.

    Raises:
        ConfigError: the first bad key or value, attributed to its source.
    """
    sources = dict(sources or {})
    config = dataclasses.replace(base) if base is not None else TrainConfig()
    for key, value in values.items():
        try:
            setattr(config, key, check_type(key, value))
        except ConfigError as err:
            raise err.with_source(sources.get(key, err.source)) from None
    try:
        check_values(config)
    except ConfigError as err:
        raise err.with_source(sources.get(err.key, err.source)) from None
    return config


def load_toml(path: str | Path) -> dict[str, Any]:
    """The top-level table of a TOML config file, parsed safely with ``tomllib``.

    Raises:
        ConfigError: the file is missing or is not valid TOML (with the parser's line and column).
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {path}", "--config") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("", f"{path} is not valid TOML: {err}", "--config") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)``; the value is read as a TOML value, else as a plain string.

    ``lr=0.1`` gives a float, ``milestones=[50,75]`` a list, ``amp=true`` a bool, ``rule_options.scale=biotorch``
    the string ``"biotorch"``.

    Raises:
        ConfigError: when there is no ``=`` or no key.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("", f"expected key=value (e.g. model_args.depth=3), got {text!r}", "--set")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def apply_override(values: dict[str, Any], key: str, value: Any, source: str = "--set") -> None:
    """Set ``key`` (possibly dotted, ``model_args.depth``) in the flat dict of config values.

    Raises:
        ConfigError: unknown top-level key, or a dotted key into a field that is not a table.
    """
    head, dot, rest = key.partition(".")
    if head not in FIELDS:
        raise ConfigError(key, f"unknown config key {head!r}; allowed keys: {allowed_keys()}", source)
    if not dot:
        values[head] = value
        return
    if _HINTS[head] is not dict:
        raise ConfigError(key, f"{head!r} is not a table, so it takes no dotted key; use --set {head}=VALUE",
                          source)
    table = values.setdefault(head, dict(getattr(TrainConfig(), head)))
    if not isinstance(table, dict):
        raise ConfigError(head, f"{head} must be a table, got {table!r}", source)
    parts = rest.split(".")
    for part in parts[:-1]:
        table = table.setdefault(part, {})
    table[parts[-1]] = value


def as_toml(values: dict[str, Any]) -> str:
    """A flat TOML rendering of a config dict (tables last, as TOML requires)."""
    scalars, tables = [], []
    for key, value in values.items():
        if isinstance(value, dict):
            body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in value.items())
            tables.append(f"\n[{key}]\n{body}")
        else:
            scalars.append(f"{key} = {json.dumps(value)}\n")  # JSON's strings, numbers, bools, lists are TOML
    return "".join(scalars) + "".join(tables)
