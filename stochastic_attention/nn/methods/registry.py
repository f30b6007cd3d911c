"""The registry of attention methods: name -> method object, in registration order.

The built-in methods register themselves when :mod:`stochastic_attention.nn.methods` imports
their modules (in the order of :data:`~stochastic_attention.vocabulary.METHODS`); a method
defined elsewhere registers with :func:`register` and is then accepted by the layer,
``SALlamaConfig`` and the budget like a built-in one. Everything here reads the registry at
call time, so a method registered later is seen everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...vocabulary import RENAMED_METHODS, RENAMED_OPTIONS, check_name

if TYPE_CHECKING:
    from .base import Method, MethodOptions

_REGISTRY: dict[str, Method] = {}
# Method name -> its options class, kept in step with the registry (the same dict object for
# the lifetime of the process, so ``from ..options import OPTIONS`` stays current).
OPTIONS: dict[str, type[MethodOptions]] = {}


def register(method):
    """Register a :class:`~.base.Method` subclass (or instance); returns its argument, so it
    can decorate the class. Its name is its options class's ``method``."""
    from .base import Method, MethodOptions

    instance = method() if isinstance(method, type) else method
    if not isinstance(instance, Method):
        raise TypeError(f"register() takes a Method subclass or instance, got {method!r}")
    cls = getattr(instance, "options_class", None)
    if not (isinstance(cls, type) and issubclass(cls, MethodOptions)):
        raise TypeError(f"{type(instance).__name__}.options_class must be a MethodOptions "
                        f"subclass, got {cls!r}")
    name = cls.method
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{cls.__name__}.method must name the method (an identifier), "
                         f"got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered; unregister it first")
    if name in RENAMED_METHODS:
        raise ValueError(f"method name {name!r} is a former name of "
                         f"{RENAMED_METHODS[name]!r}; choose another")
    renamed = sorted(set(cls.names()) & set(RENAMED_OPTIONS))
    if renamed:
        raise ValueError(f"{cls.__name__} has fields with former option names {renamed}; "
                         "use their new names")
    _REGISTRY[name], OPTIONS[name] = instance, cls
    return method


def unregister(name: str) -> None:
    """Remove a registered method (e.g. one a test registered)."""
    check_name(name, method_names())
    del _REGISTRY[name], OPTIONS[name]


def method_names() -> tuple[str, ...]:
    """The registered methods, built-in ones first, in registration order."""
    return tuple(_REGISTRY)


def method_named(name: str) -> Method:
    """The method object registered as ``name``; an unknown or former name raises."""
    return _REGISTRY[check_name(name, method_names())]


def option_names() -> tuple[str, ...]:
    """Every option name of every registered method, sorted."""
    return tuple(sorted({name for cls in OPTIONS.values() for name in cls.names()}))


def owners_of(name: str) -> tuple[str, ...]:
    """The methods that have an option called ``name``."""
    return tuple(m for m, cls in OPTIONS.items() if name in cls.names())


def sparse_decode_methods() -> tuple[str, ...]:
    """The methods whose cached decoding may sample keys (``decode="stochastic"``)."""
    return tuple(name for name, method in _REGISTRY.items() if method.decodes_sparsely)
