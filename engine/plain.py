"""Plain-weights views of a model, for exporters.

Some techniques keep their own module structure in torch, where it is real: a low-rank factored linear
is two small matmuls, so its parameter count and speed are what the user gets in the torch runtime.
GGUF and ONNX writers know only the standard Llama modules, so before exporting, every module that
offers ``to_plain()`` (returning an equivalent standard module) is replaced by it in a copy of the model.
A model without such modules is returned as it is (no copy).
"""
from __future__ import annotations

import copy


def has_custom_modules(model) -> bool:
    return any(hasattr(m, "to_plain") for m in model.modules())


def plain_weights(model):
    """The model with every ``to_plain()`` module replaced by its standard equivalent (a copy if any)."""
    if not has_custom_modules(model):
        return model
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        for child_name, child in list(module.named_children()):
            if hasattr(child, "to_plain"):
                setattr(module, child_name, child.to_plain())
    return plain
