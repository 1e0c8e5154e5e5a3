"""A yes/no value is not a number: pydantic reads ``true`` as 1 and 1.0 in lax mode, so ``--set
train.max_steps=true`` would quietly train one step and ``kto.beta=true`` set beta to 1.0. Every run-config section
runs ``no_yes_no_for_a_number`` before its fields' own validation."""
from __future__ import annotations

import typing
from typing import Any, Literal


def takes_bool(ann) -> bool:
    if ann is bool or ann is Any:
        return True
    if typing.get_origin(ann) is Literal:
        return any(isinstance(a, bool) for a in typing.get_args(ann))
    return any(takes_bool(a) for a in typing.get_args(ann))


def no_yes_no_for_a_number(cls, v, info):
    field = cls.model_fields.get(info.field_name)
    if isinstance(v, bool) and field is not None and not takes_bool(field.annotation):
        ann = field.annotation
        number = ann in (int, float) or bool({int, float} & set(typing.get_args(ann)))
        raise ValueError(f"is {str(v).lower()}, a yes/no value, but this field takes "
                         f"{'a number' if number else 'text'}: write {'the number' if number else 'the text'} itself")
    return v
