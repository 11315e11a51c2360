"""One small generic registry for everything a config or a command line names.

Rules, models, data sets, constraints, optimizers, schedules, losses and tasks each keep one
:class:`Registry`. It gives every one of them the same behaviour:

- names are normalised (case, surrounding blanks, ``-`` for ``_``) and may have aliases;
- an unknown name fails in one line: ``unknown <kind> 'y'; allowed: a, b, c (= alias)``;
- unknown options fail in one line: ``<kind> 'a' has no option(s) 'x'; allowed options: p, q``;
- ``names()`` lists the entries in registration order, ``describe()`` gives their one-line descriptions (for
  ``bioprop list``), and ``create(name, ...)`` builds one with checked options.

This module imports nothing from bioprop: every other layer may use it.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

__all__ = ["Registry", "Entry", "normalize_name"]

T = TypeVar("T")


def normalize_name(name: str) -> str:
    """The registry key for ``name``: stripped, lower case, ``-`` and blanks as ``_``."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered object with what the registry knows about it."""

    name: str
    obj: T
    aliases: tuple[str, ...] = ()
    description: str = ""
    #: Option names with their defaults (``inspect.Parameter.empty`` for required ones), or None when the
    #: entry accepts any options.
    options: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _discover_options(obj: Any, skip: int) -> dict[str, Any] | None:
    """Option names and defaults of a dataclass (its fields) or a callable (its parameters after the first
    ``skip`` positional ones); None when it takes ``**kwargs``."""
    if isinstance(obj, type) and dataclasses.is_dataclass(obj):
        return {f.name: f.default for f in dataclasses.fields(obj) if f.init}
    if not callable(obj):
        return {}
    try:
        params = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name: p.default for p in params[skip:]
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


class Registry(Generic[T]):
    """Named objects of one kind (``"rule"``, ``"model"``, ...).

    Args:
        kind: the word used in messages, e.g. ``"rule"`` or ``"data set"``.
        allowed: the word that introduces the allowed names in the unknown-name message.
        positional: how many leading positional arguments ``create`` passes that are not options (e.g. a
            model's ``num_classes, in_channels, image_size``).
    """

    def __init__(self, kind: str, *, allowed: str = "allowed", positional: int = 0) -> None:
        self.kind = kind
        self.allowed_word = allowed
        self.positional = positional
        self._entries: dict[str, Entry[T]] = {}
        self._aliases: dict[str, str] = {}

    # ---------------------------------------------------------------------------------------- registering

    def add(self, name: str, obj: T, *, aliases: tuple[str, ...] = (), description: str = "",
            options: Mapping[str, Any] | None | bool = True, **meta: Any) -> T:
        """Register ``obj`` under ``name`` and return it.

        Args:
            options: the accepted options with their defaults; True (default) reads them from ``obj``
                (dataclass fields or keyword parameters); None accepts any.
            **meta: extra facts kept on the entry (e.g. a model's default image size).

        Raises:
            ValueError: the name or an alias is empty or already taken.
        """
        key = normalize_name(name)
        for new in (key, *map(normalize_name, aliases)):
            if not new or new in self._entries or new in self._aliases:
                raise ValueError(f"{self.kind} name {new!r} is empty or already registered")
        if options is True:
            found = _discover_options(obj, self.positional)
        elif options is False:
            found = {}
        else:
            found = None if options is None else dict(options)
        if not description:
            doc = inspect.getdoc(obj) or ""
            description = doc.strip().splitlines()[0] if doc.strip() else ""
        self._entries[key] = Entry(key, obj, tuple(normalize_name(a) for a in aliases), description, found,
                                   dict(meta))
        for alias in aliases:
            self._aliases[normalize_name(alias)] = key
        return obj

    def register(self, name: str, *, aliases: tuple[str, ...] = (), description: str = "",
                 options: Mapping[str, Any] | None | bool = True, **meta: Any) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        def decorator(obj: T) -> T:
            return self.add(name, obj, aliases=aliases, description=description, options=options, **meta)
        return decorator

    # ------------------------------------------------------------------------------------------- looking up

    def allowed(self) -> str:
        """The allowed names (aliases as ``alias (= name)``), comma separated."""
        names = list(self._entries) + [f"{a} (= {n})" for a, n in self._aliases.items()]
        return ", ".join(names) if names else "(none registered)"

    def resolve(self, name: Any) -> str:
        """The canonical name for ``name`` or one of its aliases.

        Raises:
            TypeError: ``name`` is not a string.
            ValueError: unknown name, listing the allowed ones.
        """
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} must be a name (str), got {type(name).__name__}; "
                            f"{self.allowed_word}: {self.allowed()}")
        key = normalize_name(name)
        key = self._aliases.get(key, key)
        if key not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; {self.allowed_word}: {self.allowed()}")
        return key

    def entry(self, name: str) -> Entry[T]:
        """The entry for ``name`` (aliases resolved)."""
        return self._entries[self.resolve(name)]

    def get(self, name: str) -> T:
        """The object registered under ``name`` (aliases resolved)."""
        return self.entry(name).obj

    def names(self, **meta: Any) -> list[str]:
        """Registered names in registration order, optionally only those whose ``meta`` matches."""
        return [k for k, e in self._entries.items() if all(e.meta.get(m) == v for m, v in meta.items())]

    def describe(self, **meta: Any) -> list[tuple[str, str]]:
        """``(name, one-line description)`` for every entry (filtered like :meth:`names`)."""
        return [(k, self._entries[k].description) for k in self.names(**meta)]

    def options(self, name: str) -> dict[str, Any]:
        """Option names of ``name`` with their defaults (empty when it accepts any)."""
        return dict(self.entry(name).options or {})

    def check_options(self, name: str, options: Mapping[str, Any]) -> str:
        """Return the canonical name after checking that ``options`` are all accepted by ``name``.

        Raises:
            ValueError: ``<kind> 'name' has no option(s) 'x'; allowed options: ...``.
        """
        key = self.resolve(name)
        allowed = self._entries[key].options
        if allowed is None:
            return key
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            listed = ", ".join(allowed) if allowed else "(none)"
            raise ValueError(f"{self.kind} {key!r} has no option(s) {', '.join(map(repr, unknown))}; "
                             f"allowed options: {listed}")
        return key

    def create(self, name: str, *args: Any, **options: Any) -> Any:
        """Call (or instantiate) the entry for ``name`` with ``args`` and checked ``options``."""
        key = self.check_options(name, options)
        return self._entries[key].obj(*args, **options)  # type: ignore[operator]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = normalize_name(name)
        return key in self._entries or key in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
