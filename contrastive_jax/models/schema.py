"""Config groups as the keyword arguments of a Flax module, checked against its dataclass fields.

Every config group the models read (``model.image``, ``model.text``, an N-tower entry, and the
model-level fields of ``config.model``) holds the fields of one module class. That class's
dataclass fields are the schema and their defaults are THE defaults (stated nowhere else):

- :meth:`ModuleSchema.defaults` lists every field a config sets, with its default in the config's
  representation; ``models/config.py`` builds the run schema (``config.model``) from it.
- :func:`build_module` checks a group against the fields (unknown keys, types, enumerated
  values) and constructs the module; :meth:`ModuleSchema.build` does so with a schema's extra
  knowledge (defaults of fields the module leaves required, the enumerated fields' choices).

Error messages begin with the dotted path of the offending field (``model.image.pool='x'; known:
gap, cls, map``); built without a ``group`` they begin with the bare field name, so a caller that
knows where the group sits can put its path in front.

One representation rule: a field whose module default is ``None`` is ``0`` in a config (JSON and
the command-line parser keep a field's type, and ``None`` has none); ``0`` builds ``None``.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Mapping, Sequence

import numpy as np

# Flax's own dataclass fields: set by Flax, never by a config.
_FLAX_FIELDS = ("parent", "name")

_SCALAR_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def module_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of module class ``cls`` a caller may set, in declaration order."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in _FLAX_FIELDS}


def field_default(f: dataclasses.Field) -> Any:
    """``f``'s default value, or ``dataclasses.MISSING`` for a required field."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _scalar_type(f: dataclasses.Field) -> type | None:
    """bool / int / float / str for a field annotated so (or ``X | None``), else None."""
    if isinstance(f.type, str):  # modules written with `from __future__ import annotations`
        text = f.type
    elif isinstance(f.type, type):
        text = f.type.__name__
    else:
        text = str(f.type)
    text = text.replace(" ", "").replace("typing.", "")
    if text.startswith("Optional[") and text.endswith("]"):
        text = text[len("Optional["):-1]
    text = text.removesuffix("|None").removeprefix("None|")
    return _SCALAR_TYPES.get(text)


def _path(group: str, key: str) -> str:
    return f"{group}.{key}" if group else key


def _convert(path: str, value: Any, f: dataclasses.Field) -> Any:
    """A config value -> the value the module field takes (see the module docstring)."""
    typ = _scalar_type(f)
    if field_default(f) is None and (value is None or (typ in (int, float) and value == 0)):
        return None
    if typ is bool:
        # bool("false") is True: only real booleans (and 0 / 1 from JSON-ish sources) are taken.
        if isinstance(value, (bool, np.bool_, numbers.Integral)) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{path}={value!r} is not a bool")
    if typ is int:
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real) and float(value).is_integer():
            return int(value)
        raise ValueError(f"{path}={value!r} is not an integer")
    if typ is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{path}={value!r} is not a number")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{path}={value!r} is not a string")
    # Module fields must be hashable (jit keys on the module); configs hold lists for tuples.
    return tuple(value) if isinstance(value, list) else value


def build_module(cls: type, cfg: Mapping[str, Any], *, group: str = "", known: Sequence[str] = (),
                 choices: Mapping[str, Sequence[Any]] | None = None,
                 checks: Mapping[str, tuple[Callable[[Any], bool], str]] | None = None,
                 **overrides: Any) -> Any:
    """Constructs ``cls(**fields)`` from a config group checked against ``cls``'s dataclass fields.

    Args:
      cls: a module class (any dataclass works).
      cfg: the config group (ConfigDict or mapping); each key is a field of ``cls``, a key of
        ``known`` (ignored) or a key of ``overrides`` (ignored: the override wins). Fields it
        lacks take ``cls``'s defaults.
      group: the group's dotted path (``'model.image'``), the start of every error message.
      known: keys the group may hold that are not fields of ``cls`` (``'name'``, ``'extra'``,
        another tower kind's fields).
      choices: ``{field: known values}`` of enumerated fields.
      checks: ``{field: (predicate, hint)}``: a value failing the predicate is an error
        ``<path> is <value>; <hint>``.
      overrides: fields set by the caller (submodules, the compute dtype); passed unconverted.

    Returns:
      The unbound module.

    Raises:
      ValueError: an unknown key, a value of the wrong type, an unknown enumerated value or a
        missing required field, naming the field's path (and the known keys / values).
    """
    fields = module_fields(cls)
    kwargs: dict[str, Any] = {}
    unknown = []
    for key, value in cfg.items():
        if key in overrides:
            continue
        if key in fields:
            kwargs[key] = _convert(_path(group, key), value, fields[key])
        elif key not in known:
            unknown.append(key)
    if unknown:
        names = ", ".join(_path(group, k) for k in sorted(unknown))
        allowed = sorted(set(fields) - set(overrides) | set(known))
        raise ValueError(f"{names}: unknown field{'s' if len(unknown) > 1 else ''} of {cls.__name__}; "
                         f"known: {', '.join(allowed)}")
    kwargs.update(overrides)
    missing = [k for k, f in fields.items() if k not in kwargs and field_default(f) is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{_path(group, missing[0])} is required ({cls.__name__} has no default for it)")
    for key, allowed in (choices or {}).items():
        if key in kwargs and kwargs[key] not in allowed:
            raise ValueError(f"{_path(group, key)}={kwargs[key]!r}; known: {', '.join(map(str, allowed))}")
    for key, (ok, hint) in (checks or {}).items():
        if key in kwargs and not ok(kwargs[key]):
            raise ValueError(f"{_path(group, key)} is {kwargs[key]!r}; {hint}")
    return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class ModuleSchema:
    """A module class as a config group: its fields, their defaults and their valid values.

    Attributes:
      cls: the module class; its dataclass defaults are the group's defaults.
      required: config defaults for the fields ``cls`` has no default for (e.g. a ViT's width);
        naming a field that has a module default is an error (its default is stated there).
      choices: ``{field: known values}`` of enumerated fields, checked at build time.
      checks: ``{field: (predicate, hint)}``, see :func:`build_module`.
      builder_fields: fields the builder sets, not the config (absent from :meth:`defaults`);
        ``dtype`` (the compute dtype) where the module has that field.
    """

    cls: type
    required: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    choices: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
    checks: Mapping[str, tuple[Callable[[Any], bool], str]] = dataclasses.field(default_factory=dict)
    builder_fields: tuple[str, ...] = ("dtype",)

    def __post_init__(self):
        # Fail at import, where a schema is written, rather than at some later build.
        fields = module_fields(self.cls)
        name = self.cls.__name__
        # 'dtype' is a builder field only for modules that have one.
        builder_fields = [k for k in self.builder_fields if k != "dtype"]
        for key in (*self.required, *self.choices, *self.checks, *builder_fields):
            if key not in fields:
                raise TypeError(f"{name} has no field {key!r}")
        for key in self.required:
            if field_default(fields[key]) is not dataclasses.MISSING:
                raise TypeError(f"{name}.{key} has a default in {name}; do not state another in the schema")

    def defaults(self) -> dict[str, Any]:
        """Every config field with its default, in the module's field order (config form)."""
        out = {}
        for key, f in module_fields(self.cls).items():
            if key in self.builder_fields:
                continue
            if key in self.required:
                out[key] = self.required[key]
                continue
            default = field_default(f)
            if default is dataclasses.MISSING:
                raise TypeError(f"{self.cls.__name__}.{key} has no default; give one in ModuleSchema.required")
            out[key] = 0 if default is None else default
        return out

    def build(self, cfg: Mapping[str, Any], dtype: Any = None, *, group: str = "", known: Sequence[str] = (),
              **overrides: Any) -> Any:
        """``cls`` built from ``cfg`` (missing fields: :attr:`required`, then the module defaults).

        ``dtype`` (the compute dtype, ignored by a module without a ``dtype`` field) and
        ``overrides`` set :attr:`builder_fields`; the signature ``build(cfg, dtype)`` is that of
        the tower registries' builders.
        """
        if dtype is not None and "dtype" in module_fields(self.cls):
            overrides["dtype"] = dtype
        merged = dict(self.required)
        merged.update(cfg.items())
        return build_module(self.cls, merged, group=group, known=known, choices=self.choices, checks=self.checks,
                            **overrides)
