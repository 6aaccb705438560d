"""The method registry: adding a protection method is one module (or one folder, like ``fora/``, when
it needs several files) and one line here."""

from __future__ import annotations

from .base import Method, MethodContext, MethodOptions
from .corda_kpm import CordaKpm
from .ewc import Ewc
from .folora import Folora
from .fora import Fora
from .full import FullFineTune
from .kl import Kl
from .l2sp import L2sp
from .lora import Lora
from .milora import Milora
from .pissa import Pissa
from .replay import Replay
from .weightproj import WeightProj

METHODS: dict[str, type[Method]] = {
    "full": FullFineTune,
    "lora": Lora,
    "fora": Fora,
    "weightproj": WeightProj,
    "folora": Folora,
    "replay": Replay,
    "l2sp": L2sp,
    "ewc": Ewc,
    "kl": Kl,
    "pissa": Pissa,
    "milora": Milora,
    "corda_kpm": CordaKpm,
}


def get_method(name: str) -> type[Method]:
    return METHODS[name]


__all__ = ["METHODS", "Method", "MethodContext", "MethodOptions", "get_method"]
