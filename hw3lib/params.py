"""A notebook's parameters, checked. The ``parameters`` cell declares each one once, with its type and default::

    data_root: str = "data/demo/hw3_data"  # hw3_data root
    num_epochs: int = 5  # passes over the training captions

papermill (``hw3 run -p``) injects plain assignments after it; :func:`read` then checks every declared name's
value against its annotation and rejects a mistyped one with the parameter's name.
"""
from __future__ import annotations

from types import SimpleNamespace

ALLOWED = (str, int, float, bool, dict, list)


# the smallest value a number parameter may take, wherever a notebook declares it (0 where 0 means "all" or "off")
AT_LEAST = {name: 1 for name in ("num_show", "llava_num_show", "llava_batch_size", "llava_gpus", "pool", "lora_r",
                                 "lora_alpha", "attempt_lora_r", "num_epochs", "max_new_tokens", "batch_size",
                                 "eval_images", "num_beams", "score_batch_size")}
AT_LEAST.update({name: 0 for name in ("seed", "llava_num_images", "llava_sweep_images", "llava_num_workers",
                                      "llava_greedy_batch_size",
                                      "captions_per_image", "max_train_images", "no_repeat_ngram_size",
                                      "pointing_images", "attempt_epochs")})
ABOVE = {"lr": 0.0}  # strictly
CHOICES = {"compile_scope": ("step", "blocks")}  # the values a text parameter may take


def check(name: str, kind: type, value):
    """``value`` as a ``kind``: ``int`` rejects ``bool``; ``float`` accepts an ``int``; ``str`` accepts an ``int``
    (``-p attention_layer 3`` arrives as the number 3). Raises ``TypeError`` naming the parameter, and
    ``ValueError`` for a number below its parameter's bound (:data:`AT_LEAST`, :data:`ABOVE`) or a text that is not
    one of its parameter's values (:data:`CHOICES`)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif kind is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"parameter {name!r} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
    if name in CHOICES and value not in CHOICES[name]:
        raise ValueError(f"parameter {name!r} must be one of {', '.join(CHOICES[name])}, got {value!r}")
    if kind in (int, float):
        if name in AT_LEAST and not value >= AT_LEAST[name]:
            raise ValueError(f"parameter {name!r} must be at least {AT_LEAST[name]}, got {value!r}")
        if name in ABOVE and not value > ABOVE[name]:
            raise ValueError(f"parameter {name!r} must be above {ABOVE[name]}, got {value!r}")
    return value


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
