"""The rule registry and the layer-wise feedback policies.

A rule is a small policy object that says which feedback weight ``B`` a layer sends its error through. It holds
only its options; the per-layer state it needs (a fixed random ``B``, random magnitudes, a draw counter) lives
in registered buffers (or, for a learned ``B``, parameters) of the layer itself, so that it moves with
``.to()``, is saved in ``state_dict`` and is identical on every DDP rank.

Adding a rule means writing one policy and decorating it::

    @register_rule("my_rule")
    @dataclass
    class MyRule(LayerRule):
        scale: float = 1.0
        def feedback_weight(self, layer):
            return self.scale * layer.weight.sign()

Scale conventions (option ``scale``), see ``docs/rules.md``:

- ``"xiao2018"`` (default): s = sqrt(2 / (k_h·k_w·C_out)) for conv, 1/sqrt(fan_in) for linear; random draws are
  N(0, s²) for conv and U(−s, s) for linear.
- ``"biotorch"``: s = sqrt(2 / (fan_in + fan_out)), the Xavier std; random draws are Xavier-uniform,
  U(−√3·s, √3·s). The fans are ``torch.nn.init``'s: fan_in = (C_in/groups)·k_h·k_w, fan_out = C_out·k_h·k_w.
- ``"unit"``: s = 1, draws U(−1, 1).
- a positive float s: draws U(−s, s).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from .redraw import rebase_redraw_state, redraw_due, sync_redraw_state

__all__ = [
    "Rule", "LayerRule", "DirectRule", "register_rule", "list_rules", "create_rule", "rule_options",
    "resolve_rule_name", "check_scale", "feedback_scale", "draw_feedback", "draw_magnitude_8bit", "layer_seed", "SCALE_CONVENTIONS",
    "redraw_due", "sync_redraw_state", "rebase_redraw_state",
]

SCALE_CONVENTIONS = ("xiao2018", "biotorch", "unit")
NORM_MODES = (None, "init", "sn", "fa_init")

_RULES: dict[str, type["Rule"]] = {}
_ALIASES: dict[str, str] = {}

R = TypeVar("R", bound=type)


class Rule:
    """Base of every policy. Subclasses are dataclasses whose fields are the rule's options."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "layer"

    def options(self) -> dict[str, Any]:
        """The rule's options as a plain dict (for summaries, configs and checkpoints)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


class LayerRule(Rule):
    """A rule that gives each linear/conv layer its own feedback weight ``B`` (shape of ``W``)."""

    kind: ClassVar[str] = "layer"
    #: True when ``B`` is a parameter trained alongside ``W`` (it then receives ``W``'s gradient).
    learns_feedback: ClassVar[bool] = False

    def init_state(self, layer: nn.Module, generator: torch.Generator) -> None:
        """Register the buffers/parameters this rule needs on ``layer``; called once at conversion."""

    def before_forward(self, layer: nn.Module) -> None:
        """Update per-step state before a forward pass that will need ``B`` (e.g. brsf's redraw)."""

    def after_load(self, layer: nn.Module) -> None:
        """Called after the rule's state arrived in this process: ``load_state_dict``, a deep copy or unpickling,
        ``.to()``/``to_empty()``."""

    def before_save(self, layer: nn.Module) -> None:
        """Called before the rule's state leaves this process's view (``state_dict``, deep copy, pickling,
        ``.to()``): write what only this process knows (e.g. version counters) into the saved buffers."""

    def feedback_weight(self, layer: nn.Module) -> Tensor | None:
        """The ``B`` for this layer now, or None for the exact native op. Must not change any state."""
        raise NotImplementedError


class DirectRule(Rule):
    """A rule that delivers the output error directly to hidden blocks (DFA, IFA) instead of per-layer B."""

    kind: ClassVar[str] = "direct"

    def apply(self, model: nn.Module, *, seed: int, exclude: tuple, last_layer: str | None) -> nn.Module:
        """Convert ``model`` in place (placing markers) and return it."""
        raise NotImplementedError


def register_rule(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[R], R]:
    """Class decorator registering a rule under ``name`` (and optional aliases).

    Raises:
        ValueError: if the name or an alias is already taken.
    """
    def decorator(cls: R) -> R:
        for key in (name, *aliases):
            if key in _RULES or key in _ALIASES:
                raise ValueError(f"rule name {key!r} is already registered")
        cls.name = name  # type: ignore[attr-defined]
        _RULES[name] = cls  # type: ignore[assignment]
        for alias in aliases:
            _ALIASES[alias] = name
        return cls
    return decorator


def list_rules() -> list[str]:
    """Names of all registered rules, in registration order (aliases not included)."""
    _load_builtin_rules()
    return list(_RULES)


def resolve_rule_name(name: str) -> str:
    """The canonical name for ``name`` or one of its aliases.

    Raises:
        ValueError: naming the unknown rule and listing the allowed names.
    """
    _load_builtin_rules()
    if not isinstance(name, str):
        raise TypeError(f"rule must be a rule name (str), got {type(name).__name__}; allowed: {_allowed()}")
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _RULES:
        raise ValueError(f"unknown rule {name!r}; allowed rules: {_allowed()}")
    return key


def rule_options(name: str) -> dict[str, Any]:
    """Option names of a rule with their defaults."""
    cls = _RULES[resolve_rule_name(name)]
    return {f.name: f.default for f in fields(cls)}  # type: ignore[arg-type]


def create_rule(name: str, **options: Any) -> Rule:
    """Build the policy for rule ``name`` with validated options.

    Raises:
        ValueError: unknown rule, unknown option (listing the allowed ones) or bad option value.
    """
    key = resolve_rule_name(name)
    cls = _RULES[key]
    allowed = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"rule {key!r} has no option(s) {', '.join(map(repr, unknown))}; "
                         f"allowed options: {', '.join(allowed) if allowed else '(none)'}")
    return cls(**options)


def _allowed() -> str:
    names = list(_RULES)
    if _ALIASES:
        names += [f"{a} (= {n})" for a, n in _ALIASES.items()]
    return ", ".join(names)


def _load_builtin_rules() -> None:
    # The direct rules and the backprop controls live in their own modules; importing them registers them.
    from . import direct, rules_controls  # noqa: F401


# ----------------------------------------------------------------------------------------------- scales


def check_scale(scale: str | float, conventions: tuple[str, ...] = SCALE_CONVENTIONS) -> None:
    """The one validator of a feedback ``scale`` option, for layer and direct rules alike.

    Allowed: a name in ``conventions``, or a finite positive int/float (not a bool).

    Raises:
        ValueError: one line naming the bad value and what is allowed.
    """
    if isinstance(scale, str):
        if scale not in conventions:
            raise ValueError(f"unknown scale {scale!r}; allowed: {', '.join(conventions)} or a positive float")
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be one of {', '.join(conventions)} or a positive float, got {scale!r}")


_check_scale = check_scale


def _check_norm(norm: str | None, allowed: tuple = NORM_MODES[:3]) -> None:
    if norm not in allowed:
        raise ValueError(f"unknown norm {norm!r}; allowed: {', '.join(map(repr, allowed))}")


def feedback_scale(weight: Tensor, scale: str | float) -> float:
    """The magnitude ``s`` of B for a weight of this shape under a scale convention.

    Args:
        weight: the forward weight, ``(out, in)`` or ``(C_out, C_in/groups, *kernel)``.
        scale: ``"xiao2018"``, ``"biotorch"``, ``"unit"`` or a positive float.
    """
    _check_scale(scale)
    if not isinstance(scale, str):
        return float(scale)
    if scale == "unit":
        return 1.0
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    if scale == "biotorch":
        return math.sqrt(2.0 / (fan_in + fan_out))
    if weight.dim() > 2:  # conv: sqrt(2 / (k_h·k_w·C_out)); fan_out = C_out·prod(kernel)
        return math.sqrt(2.0 / fan_out)
    return 1.0 / math.sqrt(fan_in)


def draw_feedback(weight: Tensor, scale: str | float, generator: torch.Generator,
                  out: Tensor | None = None) -> Tensor:
    """A random matrix with ``weight``'s shape, drawn as the scale convention prescribes (module docstring)."""
    s = feedback_scale(weight, scale)
    if out is None:
        out = torch.empty(weight.shape, dtype=weight.dtype, device=generator.device)
    if scale == "xiao2018" and weight.dim() > 2:
        return out.normal_(0.0, s, generator=generator)
    bound = s * math.sqrt(3.0) if scale == "biotorch" else s
    return out.uniform_(-bound, bound, generator=generator)


def draw_magnitude_8bit(weight: Tensor, scale: str | float, generator: torch.Generator, out: Tensor) -> Tensor:
    """``|M|`` for a fresh M drawn as :func:`draw_feedback` would, quantised to 256 equiprobable levels.

    Level k in 0..255 stands for the quantile (k + 0.5)/256 of |M|'s distribution. One 64-bit random word
    gives seven levels, so a redraw costs about a quarter of a float draw on a CPU; that keeps brsf, which
    redraws every update, close to usf in step time.
    """
    n = out.numel()
    words = torch.empty((n + 6) // 7, dtype=torch.int64, device=out.device).random_(generator=generator)
    # random_ on int64 fills [0, 2^63): the top byte has one biased bit, so only the low seven bytes are used.
    levels = words.view(torch.uint8).view(-1, 8)[:, :7].reshape(-1)[:n].view(out.shape)  # (*weight.shape)
    s = feedback_scale(weight, scale)
    if scale == "xiao2018" and weight.dim() > 2:  # half-normal quantiles of N(0, s²), looked up
        u = (torch.arange(256, dtype=torch.float64) + 0.5) / 256
        table = (s * math.sqrt(2.0) * torch.erfinv(u)).to(device=out.device, dtype=out.dtype)
        return out.copy_(table[levels.long()])
    bound = s * math.sqrt(3.0) if scale == "biotorch" else s  # |U(-b, b)| = U(0, b)
    return torch.add(levels, 0.5, out=out).mul_(bound / 256)


def layer_seed(seed: int, layer_name: str) -> int:
    """A per-layer seed that depends only on the user's seed and the layer's name, not on the device."""
    return (int(seed) * 1_000_003 + zlib.crc32(layer_name.encode())) % (2**62)


def _cpu_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _register(layer: nn.Module, name: str, value: Tensor) -> None:
    layer.register_buffer(name, value.to(device=layer.weight.device, dtype=value.dtype))


# ----------------------------------------------------------------------------------------------- rules


@register_rule("backprop")
@dataclass
class Backprop(LayerRule):
    """Exact backprop, ``B = W`` through the native op. ``convert(model, "backprop")`` restores plain layers."""

    def feedback_weight(self, layer: nn.Module) -> Tensor | None:
        return None


@register_rule("sham")
@dataclass
class Sham(LayerRule):
    """``B = W`` sent through the feedback op: the oracle that tests the feedback path against autograd."""

    def feedback_weight(self, layer: nn.Module) -> Tensor | None:
        # Detached: B = W must not route a second gradient into W. The version counter is shared, so an
        # in-place change of W between forward and backward is still caught by autograd.
        return layer.weight.detach()


@register_rule("fa")
@dataclass
class FeedbackAlignment(LayerRule):
    """Feedback alignment (lillicrap2016): a fixed random ``B`` drawn once, kept in the buffer ``feedback_weight``.

    Args:
        scale: scale convention of the draw (module docstring).
        zero_init: nokland2016's start for tanh/logistic nets: ``B`` is a copy of the layer's initial (random)
            ``W``, then ``W`` and the bias are set to zero (``scale`` is then unused). FA leaves a zero start
            because its feedback is random; with ReLU units, whose derivative at 0 is 0, nothing would learn.
    """

    scale: str | float = "xiao2018"
    zero_init: bool = False

    def __post_init__(self) -> None:
        _check_scale(self.scale)
        if not isinstance(self.zero_init, bool):
            raise ValueError(f"zero_init must be True or False, got {self.zero_init!r}")

    def init_state(self, layer: nn.Module, generator: torch.Generator) -> None:
        if not self.zero_init:
            _register(layer, "feedback_weight", draw_feedback(layer.weight.detach(), self.scale, generator))
            return
        from .models.mlp import zero_init_
        initial = layer.weight.detach().clone()
        if not initial.any():
            raise ValueError("fa zero_init copies the layer's initial W into B, but W is all zero (was the model "
                             "built zero-initialised already?)")
        _register(layer, "feedback_weight", initial)
        zero_init_(layer)

    def feedback_weight(self, layer: nn.Module) -> Tensor | None:
        return layer.feedback_weight


@dataclass
class _SignConcordant(LayerRule):
    """Shared machinery of the sign-concordant rules: ``B = c · magnitude ∘ sign(W)``.

    ``norm`` selects the moskovitz2018 norm control: None leaves B at its convention's scale; ``"init"``
    rescales B once, at conversion, so that ``‖B‖_F = ‖W_0‖_F`` (the factor is kept in the buffer
    ``feedback_norm_scale``); ``"sn"`` rescales B at every step so that ``‖B‖_F = ‖W_t‖_F``. ``usf`` also takes
    ``"fa_init"`` (a third-party reading of "Init.", see :class:`UniformSignConcordant`).
    """

    scale: str | float = "xiao2018"
    norm: str | None = None

    allowed_norms: ClassVar[tuple] = NORM_MODES[:3]

    def __post_init__(self) -> None:
        _check_scale(self.scale)
        _check_norm(self.norm, self.allowed_norms)

    def _magnitude(self, layer: nn.Module) -> Tensor | float:
        raise NotImplementedError

    def _unnormed(self, layer: nn.Module) -> Tensor:
        return torch.sign(layer.weight).mul_(self._magnitude(layer))

    def init_state(self, layer: nn.Module, generator: torch.Generator) -> None:
        if self.norm == "init":
            with torch.no_grad():
                b0 = self._unnormed(layer)
                factor = layer.weight.norm() / b0.norm().clamp_min(torch.finfo(b0.dtype).tiny)
            _register(layer, "feedback_norm_scale", factor.detach().reshape(()))

    def feedback_weight(self, layer: nn.Module) -> Tensor | None:
        with torch.no_grad():
            b = self._unnormed(layer)
            if self.norm == "init":
                b.mul_(layer.feedback_norm_scale)
            elif self.norm == "sn":
                b.mul_(layer.weight.norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny))
        return b


@register_rule("usf", aliases=("sign_symmetry", "ss"))
@dataclass
class UniformSignConcordant(_SignConcordant):
    """Uniform sign-concordant feedback / sign symmetry (liao2016, xiao2018): ``B = s · sign(W)``, from the
    current W at every step.

    ``norm="fa_init"`` is a third-party reading of moskovitz2018's "Init.": ``B_t = |B₀| ∘ sign(W_t)`` with
    ``B₀`` drawn as ``fa`` draws its B (same seed, same scale: ``|B₀|`` is the magnitude of the B that ``fa``
    would use), kept in the buffer ``feedback_magnitude``. The B is then the one ``frsf`` gives.

    Args:
        scale: the magnitude convention of s (module docstring).
        norm: None, ``"init"``, ``"sn"`` (moskovitz2018 norm control, see :class:`_SignConcordant`) or
            ``"fa_init"``.
    """

    allowed_norms: ClassVar[tuple] = NORM_MODES

    def init_state(self, layer: nn.Module, generator: torch.Generator) -> None:
        if self.norm == "fa_init":
            magnitude = draw_feedback(layer.weight.detach(), self.scale, generator).abs_()
            _register(layer, "feedback_magnitude", magnitude)
        super().init_state(layer, generator)

    def _magnitude(self, layer: nn.Module) -> Tensor | float:
        if self.norm == "fa_init":
            return layer.feedback_magnitude
        return feedback_scale(layer.weight, self.scale)


@register_rule("brsf")
@dataclass
class BatchRandomSignConcordant(_SignConcordant):
    """Batchwise random-magnitude sign-concordant feedback (liao2016): ``B = |M_t| ∘ sign(W)``, with new
    magnitudes for every weight update.

    Each draw is quantised to 256 equiprobable levels of ``|M|``'s distribution (:func:`draw_magnitude_8bit`),
    which makes a redraw about four times cheaper on a CPU. A redraw happens at the first forward pass (with
    gradients on) after W has changed in place (:func:`redraw_due`); the draw made at conversion serves the first
    forward pass. Several forward/backward passes between two optimizer steps (gradient accumulation) therefore
    share one draw, and evaluation passes never draw. Draw ``k`` of a layer is a pure function of the layer seed
    and ``k`` (buffers ``feedback_seed``, ``feedback_draws``), and whether the next forward pass draws is saved
    too (buffer ``feedback_used``), so every DDP rank draws the same magnitudes, and a deep copy, a loaded
    ``state_dict`` or a resumed run continues the same sequence, also inside a gradient-accumulation window.
    """

    def init_state(self, layer: nn.Module, generator: torch.Generator) -> None:
        _register(layer, "feedback_magnitude", torch.zeros_like(layer.weight.detach()))
        self._init_draws(layer, generator)
        super().init_state(layer, generator)

    def _init_draws(self, layer: nn.Module, generator: torch.Generator) -> None:
        # The redraw mechanism (this method, _redraw, before_forward, after_load, before_save) is shared: bp_noise
        # reuses it.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        _register(layer, "feedback_seed", torch.tensor(seed, dtype=torch.int64))
        _register(layer, "feedback_draws", torch.tensor(0, dtype=torch.int64))
        _register(layer, "feedback_used", torch.tensor(0, dtype=torch.int64))  # int: gloo has no bool
        if not layer.weight.is_meta:  # on meta there is nothing to draw into: bioprop.reset_feedback draws later
            self._redraw(layer)

    def _redraw(self, layer: nn.Module) -> None:
        draws = int(layer.feedback_draws)
        generator = torch.Generator(device=layer.weight.device)
        generator.manual_seed((int(layer.feedback_seed) + 7919 * draws) % (2**62))
        with torch.no_grad():
            self._draw(layer, generator)
            layer.feedback_draws.fill_(draws + 1)

    def _draw(self, layer: nn.Module, generator: torch.Generator) -> None:
        """Fill the per-update random state from ``generator``: here the magnitudes ``|M_t|``."""
        draw_magnitude_8bit(layer.weight, self.scale, generator, out=layer.feedback_magnitude)

    def before_forward(self, layer: nn.Module) -> None:
        if redraw_due(layer):
            self._redraw(layer)

    def after_load(self, layer: nn.Module) -> None:
        rebase_redraw_state(layer)

    def before_save(self, layer: nn.Module) -> None:
        sync_redraw_state(layer)

    def _magnitude(self, layer: nn.Module) -> Tensor | float:
        return layer.feedback_magnitude


@register_rule("frsf")
@dataclass
class FixedRandomSignConcordant(_SignConcordant):
    """Fixed random-magnitude sign-concordant feedback (liao2016): ``B = |M₀| ∘ sign(W)``.

    ``|M₀|`` is drawn once (buffer ``feedback_magnitude``); the signs follow the current W.
    """

    def init_state(self, layer: nn.Module, generator: torch.Generator) -> None:
        magnitude = draw_feedback(layer.weight.detach(), self.scale, generator).abs_()
        _register(layer, "feedback_magnitude", magnitude)
        super().init_state(layer, generator)

    def _magnitude(self, layer: nn.Module) -> Tensor | float:
        return layer.feedback_magnitude


@register_rule("partial_concordance", aliases=("psf",))
@dataclass
class PartialSignConcordant(FixedRandomSignConcordant):
    """Partial sign concordance (liao2016): random magnitudes; a fraction ``concordance`` of the entries take
    sign(W) and the rest the opposite sign. 1.0 is frsf, 0.5 random signs, 0.0 sign-inverted.

    The magnitudes and which entries are concordant are drawn once; the signs follow W. Both are kept in the
    buffer ``feedback_magnitude``, whose entries are negative where the sign is inverted.
    """

    concordance: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.concordance, bool) or not isinstance(self.concordance, (int, float)) \
                or not 0.0 <= self.concordance <= 1.0:
            raise ValueError(f"concordance must be a fraction in [0, 1], got {self.concordance!r}")

    def init_state(self, layer: nn.Module, generator: torch.Generator) -> None:
        magnitude = draw_feedback(layer.weight.detach(), self.scale, generator).abs_()
        flip = torch.rand(magnitude.shape, generator=generator, device=generator.device) >= self.concordance
        magnitude[flip] *= -1
        _register(layer, "feedback_magnitude", magnitude)
        _SignConcordant.init_state(self, layer, generator)


@register_rule("kp", aliases=("kolen_pollack",))
@dataclass
class KolenPollack(LayerRule):
    """Kolen-Pollack (akrout2019): a learned ``B`` (parameter ``feedback_weight``) that receives exactly ``W``'s
    gradient, so any optimizer gives it ``W``'s update and weight decay makes ``W − B`` decay to 0.

    ``B`` is a new parameter. An optimizer built after conversion holds it in ``W``'s param group (same lr and
    weight decay); one built before conversion gets it added to ``W``'s group at its next step
    (:mod:`bioprop.learned`), which gives the same run.

    Args:
        scale: scale convention of the initial random ``B``.
    """

    scale: str | float = "xiao2018"
    learns_feedback: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_scale(self.scale)

    def init_state(self, layer: nn.Module, generator: torch.Generator) -> None:
        b0 = draw_feedback(layer.weight.detach(), self.scale, generator)
        layer.register_parameter("feedback_weight", nn.Parameter(b0.to(layer.weight.device)))

    def feedback_weight(self, layer: nn.Module) -> Tensor | None:
        return layer.feedback_weight


@register_rule("wm", aliases=("weight_mirror",))
@dataclass
class WeightMirror(LayerRule):
    """Weight mirrors (akrout2019): ``B`` (buffer ``feedback_weight``) is learned from noise between batches.

    :func:`bioprop.mirror.mirror_step` sends zero-mean noise ``x`` through the layer alone and applies
    ``B ← (1 − decay)·B + lr · y xᵀ / n`` with ``y = W x``; since ``E[y xᵀ] = σ² W``, B turns towards W.

    Args:
        scale: scale convention of the initial random ``B``.
        lr: mirror learning rate.
        decay: weight decay of ``B`` per mirror step.
        noise_std: std σ of the noise input.
    """

    scale: str | float = "xiao2018"
    lr: float = 0.05
    decay: float = 1e-3
    noise_std: float = 1.0

    def __post_init__(self) -> None:
        _check_scale(self.scale)
        for key in ("lr", "decay", "noise_std"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"wm option {key} must be a non-negative number, got {value!r}")

    def init_state(self, layer: nn.Module, generator: torch.Generator) -> None:
        _register(layer, "feedback_weight", draw_feedback(layer.weight.detach(), self.scale, generator))
        _register(layer, "feedback_mirror_steps", torch.tensor(0, dtype=torch.int64))

    def feedback_weight(self, layer: nn.Module) -> Tensor | None:
        return layer.feedback_weight


def make_generator(seed: int, layer_name: str) -> torch.Generator:
    """The CPU generator a layer's state is drawn from: identical on every machine, device and rank."""
    return _cpu_generator(layer_seed(seed, layer_name))
