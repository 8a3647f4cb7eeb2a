"""The sparsity methods, one module each, registered by name.

Every module in this package is imported here, so adding a method is one file (with
``@register("name", schema=...)`` on its class, its options' schema beside it) plus one YAML in
conf/method/.
"""

from ...plugins import package_modules
from .base import METHODS, Method, MethodContext, build_method, call_hook, register  # noqa: F401

package_modules(__name__, __path__, skip=("base",))
