"""Keep torch._dynamo from loading in a run that compiles nothing.

Every torch optimizer method (`Optimizer.__init__`, `step` via the functional Adam/AdamW,
`zero_grad`, `state_dict`, ...) is wrapped by `torch._disable_dynamo`, which imports
torch._dynamo on its first call only to mark the method "never trace". That import costs
~1.4 s of CPU per process (measured: `import torch` 1.5 s, `import torch, torch._dynamo`
2.9 s), paid by every rank at start: 11 s of CPU for 8 ranks, before any work. The mark only
matters inside a frame that dynamo traces; with `model.compile` off nothing is traced, so
the wrapper may call the method directly. torch caches its choice on the wrapped function
(`fn.__dynamo_disable`); `skip_dynamo_import` fills that cache with the function itself.

Where torch changes this mechanism, nothing here applies and the import simply happens
again (tests/test_fast_start.py notices: it checks that a whole run never loads dynamo).
"""

from __future__ import annotations

import importlib
import sys

import torch.optim

# torch/_compile.py's wrapper, recognised by its code object (functools.wraps copies the
# wrapped function's names onto it)
_WRAPPER_CODE = torch._disable_dynamo(lambda: None).__code__
_CACHE = "__dynamo_disable"


def _seed(wrapper) -> bool:
    """A `_disable_dynamo` wrapper: cache the wrapped function as its own "disabled" version."""
    if getattr(wrapper, "__code__", None) is not _WRAPPER_CODE or not hasattr(wrapper, "__wrapped__"):
        return False
    fn = wrapper.__wrapped__
    if getattr(fn, _CACHE, None) is None:
        setattr(fn, _CACHE, fn)
    return True


def _wrappers_in(obj) -> list:
    """The `_disable_dynamo` wrappers that `obj` is or holds in its closure (the functional
    optimizers keep theirs in a closure: `_disable_dynamo_if_unsupported`)."""
    found, todo = [], [obj]
    while todo:
        f = todo.pop()
        if not callable(f):
            continue
        if getattr(f, "__code__", None) is _WRAPPER_CODE:
            found.append(f)
        todo.extend(c.cell_contents for c in (getattr(f, "__closure__", None) or ())
                    if callable(getattr(c, "cell_contents", None)) and c.cell_contents is not f)
    return found


def skip_dynamo_import() -> int:
    """Call only when nothing in the process compiles (model.compile off). Returns how many
    wrappers were filled (0: torch no longer works this way, or dynamo is already loaded)."""
    if "torch._dynamo" in sys.modules:
        return 0
    candidates = list(vars(torch.optim.Optimizer).values())
    for module in map(importlib.import_module, ("torch.optim.adam", "torch.optim.adamw")):
        candidates += [v for v in vars(module).values() if callable(v)]
    return sum(_seed(w) for c in candidates for w in _wrappers_in(c))
