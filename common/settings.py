"""Declared settings: each config field says once its run-config key, type, range, choices and help.

A config dataclass declares a field with :func:`setting` (a nested config with :func:`section`);
the generic functions here check a value against its declaration, parse a mapping of kebab-case
keys into the dataclass, write it back, and register the keys as command-line flags. Every
mistake is one line: ``Expected run-config 'key' to be <what>, but got <value>; <fix>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedshift.common.errors import ConfigError, FedshiftError

_SETTING = "fedshift.setting"
_SECTION = "fedshift.section"
_DEST = "run_config:"  # argparse dest prefix of a declared flag
_EXTERNAL: dict[type, dict[str, Setting]] = {}  # declarations of classes defined elsewhere (ModelConfig)

Choices = Mapping[str, Any] | Callable[[], Collection[str]]


@dataclass(frozen=True)
class Setting:
    """One run-config key: its type, range, choices, help text and the fix an error suggests."""

    key: str
    kind: type  # bool, int, float or str
    default: Any
    help: str
    minimum: float | None = None  # value >= minimum
    maximum: float | None = None  # value <= maximum (the caps on a site's work included)
    above: float | None = None  # value > above
    finite: bool = True  # floats: inf and nan refused
    choices: Choices | None = None  # a registry (name -> what, or a callable listing the names)
    listed: Callable[[], Collection[str]] | None = None  # names shown in the help only (not enforced)
    allowed: Callable[[Any], bool] | None = None  # a further rule, described by ``what``
    what: str = ""  # overrides the generated "to be ..." text
    fix: str = ""  # overrides the generated fix
    error: type[FedshiftError] = ConfigError
    sample: str = ""  # an example value for error messages, where the default is none (nan)
    cap: bool = False  # the maximum bounds the work, memory or time a round costs a site
    unset: Any = None  # the run-config value that stands for the default (a run config has no nan/inf)

    def names(self) -> list[str]:
        """The choices' names, in registry order (empty when the setting has none)."""
        if self.choices is None:
            return []
        return list(self.choices if isinstance(self.choices, Mapping) else self.choices())

    def expected(self) -> str:
        """What a value must be, e.g. ``an integer in [1, 1000]``."""
        if self.what:
            return self.what
        if self.kind is bool:
            return "true or false"
        if self.choices is not None:
            registry = self.choices if isinstance(self.choices, Mapping) else {}
            described = all(isinstance(registry.get(n), str) for n in self.names())
            if described:
                return "one of " + "; ".join(f"{n!r} ({registry[n]})" for n in self.names())
            return "one of " + ", ".join(repr(n) for n in self.names())
        if self.kind is str:
            return "a string"
        noun = "an integer" if self.kind is int else ("a finite number" if self.finite else "a number")
        return noun + _range(self.above, self.minimum, self.maximum)

    def example(self) -> str:
        if self.sample:
            return self.sample
        if self.choices is not None:
            return repr(self.names()[0])
        if self.kind is bool:
            return "true" if self.default else "false"
        return repr(self.default)

    def help_text(self) -> str:
        shown = self.listed() if self.listed is not None else ()
        extra = f" (registered: {', '.join(shown)})" if shown else ""
        return f"{self.help}{extra}; run-config {self.key}".replace("%", "%%")


def _range(above: float | None, minimum: float | None, maximum: float | None) -> str:
    low = f"({above:g}" if above is not None else (f"[{minimum:g}" if minimum is not None else "")
    if low and maximum is not None:
        return f" in {low}, {maximum:g}]"
    if maximum is not None:
        return f" <= {maximum:g}"
    return f" {'>' if above is not None else '>='} {low[1:]}" if low else ""


def setting(
    key: str, default: Any = dataclasses.MISSING, *, kind: type | None = None, **declared: Any
) -> Any:
    """A dataclass field declared as run-config ``key`` (see :class:`Setting` for the keywords)."""
    factory = declared.pop("default_factory", None)
    value = factory() if factory is not None else default
    meta = Setting(key, kind or type(value), value, **declared)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={_SETTING: meta})
    return dataclasses.field(default=default, metadata={_SETTING: meta})


# metadata of a nested config dataclass whose declared keys belong to the enclosing config's run config:
# ``model: ModelConfig = field(default_factory=ModelConfig, metadata=SECTION)``
SECTION: Mapping[str, bool] = {_SECTION: True}


def declare(cls: type, settings: Mapping[str, Setting]) -> None:
    """Declare the keys of a dataclass defined elsewhere: field name -> :class:`Setting`."""
    _EXTERNAL[cls] = dict(settings)


def declared(cls: type) -> list[tuple[str, Setting | type]]:
    """``cls``'s declared fields in field order: (name, setting) or (name, nested section class)."""
    external = _EXTERNAL.get(cls, {})
    out: list[tuple[str, Setting | type]] = []
    for f in dataclasses.fields(cls):
        entry = f.metadata.get(_SETTING) or external.get(f.name)
        if f.metadata.get(_SECTION):
            entry = f.default_factory
        if entry is not None:
            out.append((f.name, entry))
    return out


def keys_of(cls: type) -> dict[str, str]:
    """``cls``'s own run-config keys (sections not included) -> field names."""
    return {entry.key: name for name, entry in declared(cls) if isinstance(entry, Setting)}


def all_settings(cls: type) -> list[Setting]:
    """Every key of ``cls`` and its sections, in run-config order."""
    out: list[Setting] = []
    for _, entry in declared(cls):
        out.extend([entry] if isinstance(entry, Setting) else all_settings(entry))
    return out


def setting_of(cls: type, key: str) -> Setting:
    """The declaration of run-config ``key`` in ``cls`` or its sections."""
    for s in all_settings(cls):
        if s.key == key:
            return s
    raise KeyError(key)


def fail(s: Setting, value: Any, source: str = "run-config", fix: str = "") -> FedshiftError:
    """The one-line error of a bad value of ``s`` (a cap's own text when ``fix`` is the cap's)."""
    what = f"at most {s.maximum:g}" if fix == _CAP_FIX else s.expected()
    hint = fix or s.fix or f"e.g. {s.key} = {s.example()}"
    where = f"{source} " if source else ""
    return s.error(f"Expected {where}{s.key!r} to be {what}, but got {value!r}; {hint}")


def check_value(s: Setting, value: Any, source: str = "run-config", *, caps: bool = True) -> Any:
    """``value`` checked against ``s`` (ints accepted for floats, integral floats for ints).

    ``caps=False`` leaves out the caps on a site's work (``cap=True`` maxima): they bound what a run
    config may ask of a hospital's machine, not what code builds for itself (the local-only baseline
    trains rounds x epochs in one call, a benchmark may time a larger batch)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if s.kind is float and number:
        value = float(value)
    elif s.kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, s.kind) or (s.kind is not bool and isinstance(value, bool)):
        raise fail(s, value, source)
    return _checked_range(s, value, source, caps)


def _checked_range(s: Setting, value: Any, source: str, caps: bool) -> Any:
    if s.kind in (int, float):
        if s.maximum is not None and value > s.maximum and (caps or not s.cap):
            raise fail(s, value, source, _CAP_FIX) if s.cap else fail(s, value, source)
        bad_low = (s.minimum is not None and not value >= s.minimum) or (
            s.above is not None and not value > s.above
        )
        if bad_low or (s.finite and not math.isfinite(value)):
            raise fail(s, value, source)
    if s.choices is not None and value not in s.names():
        raise fail(s, value, source)
    if s.allowed is not None and not s.allowed(value):
        raise fail(s, value, source)
    return value


_CAP_FIX = "lower it (sites refuse larger values, which could exhaust a hospital's machine)"


def check_fields(obj: Any) -> None:
    """Check (and normalise in place) every declared field of the frozen dataclass ``obj``; the caps on a
    site's work are checked where a run config is read (:func:`with_values`), not here."""
    for name, entry in declared(type(obj)):
        if isinstance(entry, Setting):
            object.__setattr__(obj, name, check_value(entry, getattr(obj, name), caps=False))


def with_values(obj: Any, values: Mapping[str, Any], source: str = "run-config") -> Any:
    """A copy of ``obj`` with the declared keys present in ``values`` applied (sections included)."""
    changes: dict[str, Any] = {}
    for name, entry in declared(type(obj)):
        if isinstance(entry, Setting):
            if entry.key in values:
                changes[name] = check_value(entry, values[entry.key], source)
        else:
            inner = getattr(obj, name)
            updated = with_values(inner, values, source)
            if updated is not inner:
                changes[name] = updated
    return dataclasses.replace(obj, **changes) if changes else obj


def to_run_config(obj: Any) -> dict[str, Any]:
    """The declared keys of ``obj`` and its sections (a non-finite value as its ``unset`` stand-in)."""
    out: dict[str, Any] = {}
    for name, entry in declared(type(obj)):
        value = getattr(obj, name)
        if isinstance(entry, Setting):
            unset = entry.unset is not None and isinstance(value, float) and not math.isfinite(value)
            out[entry.key] = entry.unset if unset else value
        else:
            out.update(to_run_config(value))
    return out


def check_known(values: Iterable[str], known: Collection[str], source: str = "run-config") -> None:
    """Refuse the first key of ``values`` not in ``known``, naming it (and its value) and the known keys."""
    unknown = sorted(set(values) - set(known))
    if unknown:
        key = unknown[0]
        given = f"{key!r} = {values[key]!r}" if isinstance(values, Mapping) else repr(key)
        raise ConfigError(
            f"Expected {source} {key!r} to be a known key (one of {', '.join(sorted(known))}), but got "
            f"unknown key {given}; check the spelling (keys are kebab-case)"
        )


def from_run_config(cls: type, values: Mapping[str, Any], source: str = "run-config") -> Any:
    """``cls()`` with ``values`` applied; unknown keys refused, ``unset`` stand-ins read as the default."""
    settings = all_settings(cls)
    check_known(values, [s.key for s in settings], source)
    unset = {s.key: s.unset for s in settings if s.unset is not None}
    given = {k: v for k, v in values.items() if not (k in unset and _same(v, unset[k]))}
    return with_values(cls(), given, source)


def _same(value: Any, unset: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == unset


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    settings: Sequence[Setting],
    *,
    flags: Mapping[str, Sequence[str]] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Register ``--<key>`` for each setting: type, choices and help from its declaration.

    ``flags`` renames a key's flags (e.g. ``{"learning-rate": ["--lr", "--learning-rate"]}``).
    Without a ``defaults`` entry nothing is set unless given, and :func:`run_config_from_arguments`
    returns only what the user set; a key in ``defaults`` is always returned (its value unless given).
    """
    for s in settings:
        names = list((flags or {}).get(s.key, [f"--{s.key}"]))
        given = (defaults or {}).get(s.key, argparse.SUPPRESS)
        kw: dict[str, Any] = {"dest": _DEST + s.key, "default": given}
        kw["help"] = (
            f"{s.help_text()} (default: {_shown(s.default if given is argparse.SUPPRESS else given)})"
        )
        if s.kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = s.kind
            kw["metavar"] = s.kind.__name__.upper() if s.choices is None else None
            if s.choices is not None:
                kw["choices"] = s.names()
        parser.add_argument(*names, **kw)


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and not math.isfinite(value):
        return "not set"
    return str(value) if value != "" else '""'


def run_config_from_arguments(namespace: argparse.Namespace) -> dict[str, Any]:
    """The run-config overrides the user set with flags registered by :func:`add_arguments`."""
    return {k[len(_DEST) :]: v for k, v in vars(namespace).items() if k.startswith(_DEST)}
