"""The step registry: each technique, export and measurement is a small unit registered by name.

A step is a function ``run(ctx: RunContext, config) -> None`` plus a typed config dataclass. Registering
it makes it usable in recipes, the CLI (``edgetailor steps``) and the GUI's recipe editor, the way gguf-py
registers quant types and Olive registers passes::

    @dataclass
    class MagnitudePruneConfig:
        sparsity: float = 0.5

    @register_step("prune.magnitude", MagnitudePruneConfig, kind="transform",
                   summary="Zero the smallest weights", exports="GGUF and ONNX (plain weights)")
    def magnitude_prune(ctx: RunContext, cfg): ...
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from dataclasses import dataclass
from typing import Any, Callable

from .errors import EdgeTailorError

STEP_KINDS = ("transform", "export", "measure")


@dataclass
class StepInfo:
    name: str
    config_cls: type
    run: Callable[[Any, Any], None]
    kind: str
    summary: str
    exports: str = ""
    needs_supported_arch: bool = True
    ram_multiple_fn: Callable[[Any], float] | None = None
    #: disk the step writes, files and scratch: (config, ModelShape) -> bytes
    disk_bytes_fn: Callable[[Any, Any], float] | None = None
    #: RAM when the step reads the untouched source from its files: (config, ModelShape) -> StepNeed, or None
    #: where it cannot (see ``engine.footprint``)
    streamed_ram_fn: Callable[[Any, Any], Any] | None = None
    #: RAM when the step holds the model and says what it holds (training: weights, gradients, optimizer state,
    #: activations): (config, ModelShape) -> StepNeed; otherwise the fp32 model times ``ram_multiple``
    held_ram_fn: Callable[[Any, Any], Any] | None = None

    def parse(self, params: dict | None) -> Any:
        """Build the typed config from recipe parameters, with a clear message for bad ones."""
        return parse_config(self.config_cls, params or {}, where=f"step '{self.name}'")

    def ram_multiple(self, cfg) -> float:
        return self.ram_multiple_fn(cfg) if self.ram_multiple_fn else 1.0

    def streamed_ram(self, cfg, shape):
        return self.streamed_ram_fn(cfg, shape) if self.streamed_ram_fn else None

    def held_ram(self, cfg, shape):
        return self.held_ram_fn(cfg, shape) if self.held_ram_fn else None

    def disk_bytes(self, cfg, shape) -> float:
        return self.disk_bytes_fn(cfg, shape) if self.disk_bytes_fn else 0

    def describe(self) -> dict:
        fields = []
        hints = typing.get_type_hints(self.config_cls)
        for f in dataclasses.fields(self.config_cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            fields.append({"name": f.name, "type": _type_name(hints[f.name]), "default": default,
                           "help": f.metadata.get("help", "")})
        return {"name": self.name, "kind": self.kind, "summary": self.summary, "exports": self.exports,
                "params": fields}


_STEPS: dict[str, StepInfo] = {}
_loaded = False


def register_step(name: str, config: type, *, kind: str, summary: str, exports: str = "",
                  needs_supported_arch: bool = True, ram_multiple=None, disk_bytes=None, streamed_ram=None,
                  held_ram=None):
    if kind not in STEP_KINDS:
        raise ValueError(f"kind must be one of {STEP_KINDS}")
    if not dataclasses.is_dataclass(config):
        raise TypeError("a step's config must be a dataclass")

    def deco(fn):
        if name in _STEPS and _STEPS[name].run is not fn:
            raise ValueError(f"step '{name}' is registered twice")
        _STEPS[name] = StepInfo(name, config, fn, kind, summary, exports, needs_supported_arch,
                                ram_multiple if callable(ram_multiple) else (
                                    (lambda cfg, m=ram_multiple: m) if ram_multiple else None),
                                disk_bytes, streamed_ram, held_ram)
        return fn

    return deco


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from . import steps

    for mod in pkgutil.iter_modules(steps.__path__):
        importlib.import_module(f"{steps.__name__}.{mod.name}")


def all_steps() -> dict[str, StepInfo]:
    _load_all()
    return dict(_STEPS)


def get_step(name: str) -> StepInfo:
    _load_all()
    try:
        return _STEPS[name]
    except KeyError:
        raise EdgeTailorError(f"There is no step named '{name}'.",
                              f"Use one of: {', '.join(sorted(_STEPS))} (CLI: edgetailor steps).") from None


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def parse_config(cls: type, params: dict, where: str = "config"):
    if not isinstance(params, dict):
        raise EdgeTailorError(f"The parameters of {where} must be a mapping, not {type(params).__name__}.",
                              "Write them as name: value pairs.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise EdgeTailorError(f"{where} has no parameter {', '.join(map(repr, unknown))}.",
                              f"Its parameters are: {', '.join(sorted(names)) or '(none)'}.")
    values = {}
    for key, value in params.items():
        try:
            values[key] = _coerce(value, hints[key])
        except (TypeError, ValueError) as exc:
            raise EdgeTailorError(f"{where}: parameter '{key}' = {value!r} is not a {_type_name(hints[key])}.",
                                  "Fix its value in the recipe.") from exc
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise EdgeTailorError(f"{where}: {exc}", "Fix the parameter in the recipe.") from exc


def _coerce(value, tp):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a)
            except (TypeError, ValueError) as exc:
                errors.append(exc)
        raise ValueError(errors)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError("expected a list")
        inner = args[0] if args else Any
        out = [_coerce(v, inner) for v in value]
        return out if origin is list else tuple(out)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise TypeError("expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise TypeError("expected true or false")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError("expected an integer")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise TypeError("expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise TypeError("expected text")
        return str(value)
    return value
