"""A notebook's parameters, checked. The ``parameters`` cell declares each one once, with its type and default::

    data_root: str = "data/demo/hw3_data"  # hw3_data root
    num_epochs: int = 5  # passes over the training captions

papermill (``hw3 run -p``) injects plain assignments after it; :func:`read` then checks every declared name's
value against its annotation and rejects a mistyped one with the parameter's name.
"""
from __future__ import annotations

from types import SimpleNamespace

ALLOWED = (str, int, float, bool, dict, list)


def check(name: str, kind: type, value):
    """``value`` as a ``kind``: ``int`` rejects ``bool``; ``float`` accepts an ``int``; ``str`` accepts an ``int``
    (``-p attention_layer 3`` arrives as the number 3). Raises ``TypeError`` naming the parameter."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise TypeError(f"parameter {name!r} must be {kind.__name__}, got {value!r} ({type(value).__name__})")


def read(namespace: dict) -> SimpleNamespace:
    """The parameters that the notebook's ``parameters`` cell annotated, from ``namespace`` (its ``globals()``)."""
    declared = namespace.get("__annotations__", {})
    if not declared:
        raise NameError("no parameters declared: the parameters cell annotates each one (`name: type = value`)")
    values = {}
    for name, kind in declared.items():
        if kind not in ALLOWED:
            raise TypeError(f"parameter {name!r}: type {kind!r} is not one of {[k.__name__ for k in ALLOWED]}")
        values[name] = check(name, kind, namespace[name])
    return SimpleNamespace(**values)
