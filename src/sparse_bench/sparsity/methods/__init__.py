"""The sparsity methods, one module each, registered by name.

Every module in this package is imported here, so adding a method is one file (with
``@register("name")`` on its class) plus one YAML in src/sparse_bench/conf/method/.
"""

import importlib
import pkgutil

from .base import METHODS, Method, MethodContext, build_method, register  # noqa: F401

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")
