"""Names of a package imported on first use (PEP 562), shared by the package ``__init__``s.

A package whose pieces pull in heavy libraries (jax, grain, TFDS, matplotlib) lists its public
names per submodule; importing the package then imports none of them until a name is used, so a
light piece (a config schema, a dataset table) stays light.
"""
import importlib
from typing import Callable, Iterable, Mapping


def lazy_exports(package: str, exports: Mapping[str, Iterable[str]], submodules: Iterable[str] = ()
                 ) -> tuple[list[str], Callable[[str], object], Callable[[], list[str]]]:
    """``(__all__, __getattr__, __dir__)`` for ``package``.

    Args:
      package: the package's ``__name__``.
      exports: submodule name -> the public names it defines.
      submodules: submodules that resolve as attributes too (``package.retrieval``).
    """
    where = {name: module for module, names in exports.items() for name in names}
    subs = tuple(submodules)
    names = sorted(where)

    def getattr_(name):
        if name in where:
            return getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        if name in subs:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def dir_():
        return sorted(set(names) | set(subs))

    return names, getattr_, dir_
