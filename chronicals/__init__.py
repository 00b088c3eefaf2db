"""``import chronicals`` — the short name for :mod:`chronicals_fx`."""

import sys as _sys

from chronicals_fx import *  # noqa: F401,F403
from chronicals_fx import __all__, __version__  # noqa: F401

# `import chronicals.runtime` etc. resolve to the real subpackages.
for _name in ("runtime", "passes", "kernels", "backend", "config", "report"):
    _module = __import__(f"chronicals_fx.{_name}", fromlist=["_"])
    _sys.modules[f"{__name__}.{_name}"] = _module
    globals()[_name] = _module
