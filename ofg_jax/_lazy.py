"""A package's public names imported from its submodules on first use (PEP 562),
so that importing the package imports none of them (nor JAX)."""

import importlib
import sys
from typing import Any, Callable, Mapping, Sequence


def attach(package: str, sources: Mapping[str, str], names: Sequence[str]
           ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` of the package named ``package``.

    The name ``n`` of ``sources`` is ``getattr(import_module(f"{package}.{sources[n]}"),
    n)``, imported on its first access and kept in the package's namespace;
    ``__dir__`` lists ``names`` with what the namespace holds.
    """
    def __getattr__(name: str) -> Any:
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{sources[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__
