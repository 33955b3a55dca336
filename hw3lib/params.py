"""Checks for a notebook's ``parameters`` cell: papermill injects whatever it is given, so the cell after it
turns the flat primitives into a typed namespace and rejects mistyped values with the parameter's name."""
from __future__ import annotations

from types import SimpleNamespace


def typed(spec: dict[str, type | tuple[type, ...]], namespace: dict) -> SimpleNamespace:
    """Pick ``spec``'s names from ``namespace`` (a notebook's ``globals()``) and check their types.

    ``int`` rejects ``bool``; ``float`` accepts ``int``. Raises ``TypeError``/``NameError`` naming the parameter.
    """
    out = {}
    for name, kind in spec.items():
        if name not in namespace:
            raise NameError(f"parameter {name!r} is not defined in the parameters cell")
        value = namespace[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = any(isinstance(value, k) and not (k is int and isinstance(value, bool)) for k in kinds) or (
            float in kinds and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            want = " or ".join(k.__name__ for k in kinds)
            raise TypeError(f"parameter {name!r} must be {want}, got {value!r} ({type(value).__name__})")
        out[name] = float(value) if kinds == (float,) else value
    return SimpleNamespace(**out)
