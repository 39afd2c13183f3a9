"""Run a function on a module right after it is imported, before anything else uses it.

`AfterImport(hooks)` is a meta-path finder: for a module named in `hooks` it lets the other finders find
the module and wraps its loader, so that `hooks[name](module)` runs right after the module's code. Several
such finders can be installed at once (each asks the others, never itself twice). Modules already imported
when it is installed are hooked at once (`install`)."""
from __future__ import annotations

import importlib.abc
import sys
from typing import Callable


class AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, hooks: dict[str, Callable], done: set[str]):
        self.hooks, self.done = hooks, done
        self._busy: set[str] = set()

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.hooks or fullname in self.done or fullname in self._busy:
            return None
        self._busy.add(fullname)   # while the other finders are asked, this one stays out of the way
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.discard(fullname)
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return None
        hook, done = self.hooks[fullname], self.done

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                done.add(fullname)
                hook(module)

        spec.loader = _Loader()
        return spec


def install(hooks: dict[str, Callable], done: set[str]) -> bool:
    """Put an AfterImport for `hooks` first on sys.meta_path (once per `hooks`) and hook the modules that
    are already imported. Returns False when it was installed before."""
    if any(isinstance(f, AfterImport) and f.hooks is hooks for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, AfterImport(hooks, done))
    for name, hook in hooks.items():
        if name in sys.modules and name not in done:
            done.add(name)
            hook(sys.modules[name])
    return True
