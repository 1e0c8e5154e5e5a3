"""Gradio components built from the run config's fields: label, help text, bounds and choices come from the
config, never retyped, and values go back through ``RunConfig.updated`` (validated, errors name the field)."""
from __future__ import annotations

import types
import typing

import gradio as gr
from annotated_types import Ge, Gt, Le, Lt

from studio.config.run import RunConfig


def _field(section: str, name: str):
    section_model = RunConfig.model_fields[section].annotation
    return section_model.model_fields[name]


def _number_or_word(ann) -> bool:
    """A union of a number and a word: ``float | Literal['auto']`` (train.num_train_epochs) or
    ``int | Literal['auto']``."""
    args = typing.get_args(ann)
    return typing.get_origin(ann) in (typing.Union, types.UnionType) and any(a in (int, float) for a in args) \
        and any(typing.get_origin(a) is typing.Literal for a in args)


def shown(section: str, name: str, value):
    """The value as its component shows it: a whole number of a number-or-'auto' field without '.0' (2, not 2.0)."""
    if _number_or_word(_field(section, name).annotation) and isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value


def field_component(cfg: RunConfig, section: str, name: str, **kw):
    """A component for ``cfg.<section>.<name>`` with its current value."""
    f = _field(section, name)
    value = getattr(getattr(cfg, section), name)
    label = kw.pop("label", name.replace("_", " "))
    info = kw.pop("info", f.description)
    ann = f.annotation
    common = dict(label=label, info=info, value=shown(section, name, value), elem_id=f"cfg-{section}-{name}", **kw)
    if typing.get_origin(ann) is typing.Literal:
        return gr.Dropdown(choices=list(typing.get_args(ann)), **common)
    if ann is bool:
        return gr.Checkbox(**common)
    if ann in (int, float):
        lo = hi = None
        for m in f.metadata:
            if isinstance(m, (Ge, Gt)):
                lo = getattr(m, "ge", None) if isinstance(m, Ge) else m.gt
            if isinstance(m, (Le, Lt)):
                hi = getattr(m, "le", None) if isinstance(m, Le) else m.lt
        return gr.Number(minimum=lo, maximum=hi, precision=0 if ann is int else None, **common)
    if value is None:
        common["value"] = ""
    if _number_or_word(ann):  # a number or 'auto': one line; the config's validator reads "2" as 2.0
        common.update(lines=1, max_lines=1)
    return gr.Textbox(**common)


def collect(fields: list[tuple[str, str]], values) -> dict:
    """{'section.name': value} from component values, in the order of ``fields``; empty text means None."""
    out = {}
    for (section, name), v in zip(fields, values):
        f = _field(section, name)
        if isinstance(v, str) and v.strip() == "" and f.default is None:
            v = None
        if f.annotation is int and isinstance(v, float) and v.is_integer():
            v = int(v)
        out[f"{section}.{name}"] = v
    return out
