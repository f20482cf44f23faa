"""Named, removable rewiring of a model's modules onto our kernels.

Every change the kernels make to a module — its class swapped for a subclass that calls them,
its `forward` replaced on the instance, the model's attention routed through a registered
implementation — goes through the functions here, which note what was there first on the
module itself (`vramancer_rewired`). `restore(model)` puts every noted module back as
transformers built it, as accelerate's `remove_hook_from_module` does for its hooks.
"""

from __future__ import annotations

import types
from typing import Callable

from torch import nn

NOTE = "vramancer_rewired"  # the attribute holding what a module was before it was rewired
ABSENT = object()  # no forward of the instance's own: the class's runs


def _note(module: nn.Module) -> dict:
    note = vars(module).get(NOTE)
    if note is None:
        note = {}
        object.__setattr__(module, NOTE, note)  # plain data, never a submodule or parameter
    return note


def swap_class(module: nn.Module, cls: type) -> None:
    """Make `module` an instance of `cls` (a subclass of its own class, same state)."""
    _note(module).setdefault("class", type(module))
    module.__class__ = cls


def swap_forward(module: nn.Module, forward: Callable) -> None:
    """Give `module` its own `forward(self, ...)`, in place of the one it had."""
    _note(module).setdefault("forward", vars(module).get("forward", ABSENT))
    module.forward = types.MethodType(forward, module)


def route_attention(model: nn.Module, name: str) -> None:
    """Run `model`'s attention through the implementation registered with transformers as `name`."""
    _note(model).setdefault("attention", model.config._attn_implementation)
    model.set_attn_implementation(name)


def is_rewired(module: nn.Module) -> bool:
    return bool(vars(module).get(NOTE))


def restore(model: nn.Module) -> int:
    """Undo every rewiring of `model` and its modules; returns how many modules were restored."""
    restored = 0
    for module in model.modules():
        note = vars(module).pop(NOTE, None)
        if not note:
            continue
        if "class" in note:
            module.__class__ = note["class"]
        if "forward" in note:
            vars(module).pop("forward", None)
            if note["forward"] is not ABSENT:
                module.forward = note["forward"]
        if "attention" in note:
            module.set_attn_implementation(note["attention"])
        for name in [name for name in vars(module) if name.startswith("vramancer_")]:
            delattr(module, name)
        restored += 1
    return restored
