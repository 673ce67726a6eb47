"""Lazy package attributes (PEP 562), so light commands stay light.

A package's `__init__` maps each public name to the module that defines
it; the module is imported the first time the name is used. The
`keras-lora` command relies on this: `--help` imports no Keras backend.
"""

import importlib


def lazy_module(package, exports):
    """`(__getattr__, __dir__)` for a package `__init__`.

    Args:
        package: the package's `__name__`.
        exports: `{public name: module path}`; a name whose module path is
            the package itself plus the name is a submodule.
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name):
        module = exports.get(name)
        if module is None:
            raise AttributeError(
                f"module {package!r} has no attribute {name!r}"
            )
        loaded = importlib.import_module(module)
        value = (
            loaded if module == f"{package}.{name}" else getattr(loaded, name)
        )
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(exports) | set(namespace))

    return __getattr__, __dir__
