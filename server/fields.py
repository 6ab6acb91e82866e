"""Validation of protobuf request fields shared by the service modules: text and id lists -> clean values, or
InvalidArgument naming the field and the limit."""
from __future__ import annotations

from common.text import has_control_chars
from server.errors import InvalidArgument

MAX_ID_CHARS = 256
MAX_FILTER_VALUE_CHARS = 200  # a filter value, category, brand, attribute, keyword term


def text_field(value: str, field: str, limit: int, *, required: bool) -> str:
    text = value.strip()
    if required and not text:
        raise InvalidArgument(f"{field} must not be empty or whitespace", field=field)
    if len(value) > limit:
        raise InvalidArgument(f"{field} is {len(value)} characters; the limit is {limit}", field=field)
    if has_control_chars(value):
        raise InvalidArgument(f"{field} must not contain control characters", field=field)
    return text


def id_list(values, field: str, limit: int) -> tuple[str, ...]:
    if len(values) > limit:
        raise InvalidArgument(f"{field} has {len(values)} ids; the limit is {limit}", field=field)
    return tuple(text_field(v, f"{field}[{i}]", MAX_ID_CHARS, required=True) for i, v in enumerate(values))
