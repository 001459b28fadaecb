"""The one configuration object of ``solvers`` and ``otlinop``.

Process-wide switches (checks, fused kernels, CUDA graphs, precision
shortcuts) live here and nowhere else. Each switch is declared once, by the
module that reads it, with its default, its type and what it does; a reader
asks ``config.name``. Changing a switch is scoped::

    from otlinop import config
    with config.override(check_finite=False):
        ...                           # restored on exit, errors included

There is no other way to change one: assignment raises, so that no script
can leave a switch flipped for the rest of the process. ``solvers`` declares
its own switches and knows nothing of optimal transport; ``otlinop``
declares its switches on the same object when it is imported, so
``otlinop.config is solvers.config``.

The switches are process-wide, not per thread: an ``override`` in one thread
is seen by the others while it lasts.
"""

from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass

__all__ = ["Config", "config"]


@dataclass(frozen=True)
class _Switch:
    default: object
    kind: str       # "bool" or "int"
    doc: str
    owner: str


def _accepts(kind: str, value) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    # bool is an Integral: refuse it where a count is meant.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


class Config:
    """Named process-wide switches with scoped overrides.

    Read a switch as an attribute (``config.check_finite``); change it only
    inside ``with config.override(name=value, ...)``. ``config.describe()``
    lists every switch with its value, default and meaning.
    """

    def __init__(self):
        object.__setattr__(self, "_switches", {})

    def declare(self, name: str, default, doc: str, *, owner: str) -> None:
        """Declare a switch (once per process; a module's import does it).

        ``default`` is a bool or a non-negative int, which fixes the type that
        :meth:`override` accepts. Declaring the same name again with the same
        default is a no-op (a module re-imported by a test); with another
        default it is an error.
        """
        kind = "bool" if isinstance(default, bool) else "int"
        if not _accepts(kind, default):
            raise TypeError(f"config.declare: the default of {name!r} must be a bool or a non-negative int, "
                            f"got {default!r}")
        known = self._switches.get(name)
        if known is not None:
            if known.default != default or known.kind != kind:
                raise ValueError(f"config.declare: {name!r} is already declared by {known.owner} with default "
                                 f"{known.default!r}; {owner} declares it with {default!r}")
            return
        self._switches[name] = _Switch(default, kind, doc, owner)
        object.__setattr__(self, name, default)

    def __setattr__(self, name, value):
        raise AttributeError(f"config.{name} cannot be assigned; change it inside "
                             f"`with config.override({name}=...)`, which restores it on exit")

    def __getattr__(self, name):
        # Only reached for names that are not switches (or private attributes).
        known = ", ".join(sorted(self._switches)) or "none declared yet"
        raise AttributeError(f"config has no switch {name!r}; the switches are: {known}")

    @contextlib.contextmanager
    def override(self, **switches):
        """Set switches inside a ``with`` block; restore them on exit, errors included.

        Raises
        ------
        AttributeError
            For a name that is not a declared switch.
        TypeError
            For a value of the wrong type (a bool switch takes True/False, a
            count a non-negative int).
        """
        for name, value in switches.items():
            sw = self._switches.get(name)
            if sw is None:
                self.__getattr__(name)
            if not _accepts(sw.kind, value):
                want = "True or False" if sw.kind == "bool" else "a non-negative int"
                raise TypeError(f"config.override: {name} takes {want}, got {value!r}")
        saved = {name: getattr(self, name) for name in switches}
        for name, value in switches.items():
            object.__setattr__(self, name, value)
        try:
            yield self
        finally:
            for name, value in saved.items():
                object.__setattr__(self, name, value)

    def state(self) -> tuple:
        """Every switch's current value, as a hashable ``((name, value), ...)`` sorted by name.

        What a cache of work that depends on the switches (the loss's cached CUDA
        graphs) keys its entries on, so that an ``override`` never replays work
        recorded under other values.
        """
        return tuple((name, getattr(self, name)) for name in sorted(self._switches))

    def describe(self) -> str:
        """One line per switch: name, value, default, owner and meaning."""
        lines = []
        for name in sorted(self._switches):
            sw = self._switches[name]
            lines.append(f"{name} = {getattr(self, name)!r} (default {sw.default!r}, {sw.owner}): {sw.doc}")
        return "\n".join(lines)

    def __repr__(self):
        values = ", ".join(f"{name}={getattr(self, name)!r}" for name in sorted(self._switches))
        return f"Config({values})"

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._switches))


#: The process's configuration: ``solvers.config`` and ``otlinop.config``.
config = Config()
