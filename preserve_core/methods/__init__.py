"""The method registry: adding a protection method is one module and one line here."""

from __future__ import annotations

from .base import Method, MethodContext, MethodOptions
from .full import FullFineTune
from .lora import Lora

METHODS: dict[str, type[Method]] = {
    "full": FullFineTune,
    "lora": Lora,
}


def get_method(name: str) -> type[Method]:
    return METHODS[name]


__all__ = ["METHODS", "Method", "MethodContext", "MethodOptions", "get_method"]
