"""``deep_ep`` over epcomm: DeepEP 1.x's Python API for code that imports DeepEP by name.

Frameworks (vLLM, SGLang, Megatron-LM) ``import deep_ep`` in processes they start; this package
answers with epcomm's DeepEP-compatible classes (docs/contract.md §4): ``Buffer``, ``Config``,
``EventOverlap``, ``EventHandle``, ``topk_idx_t``, and ``deep_ep.utils`` / ``deep_ep.buffer``
as DeepEP 1.x lays them out. ``deep_ep.__version__`` is ``"1.2.1+epcomm.<epcomm version>"`` and
``deep_ep.__backend__`` is ``"epcomm"``; python/README.md lists what a client can still notice.

Opt-in and never in a real DeepEP's way: it exists only where someone installed it
(``pip install --no-build-isolation --no-deps ./python/deep_ep_compat``) or put its directory
on PYTHONPATH, and when another ``deep_ep`` package is found further along ``sys.path`` that one is
loaded instead (a warning says so). ``EPCOMM_DEEP_EP=1`` makes this one win anyway.

Importing needs epcomm but not PyTorch (so a probe like ``import deep_ep`` answers without it);
making a ``Buffer`` without PyTorch raises RuntimeError saying so.
"""

import importlib.machinery
import importlib.util
import os
import sys
import warnings

_HERE = os.path.dirname(os.path.realpath(__file__))


def _other_deep_ep():
    """The sys.path entry of another ``deep_ep`` package (a real DeepEP: not a copy of this one, which
    _epcomm_compat.py marks), or None."""
    for entry in sys.path:
        candidate = os.path.join(entry or os.getcwd(), "deep_ep")
        try:
            if os.path.realpath(candidate) == _HERE:
                continue
            if os.path.isfile(os.path.join(candidate, "__init__.py")) and \
                    not os.path.isfile(os.path.join(candidate, "_epcomm_compat.py")):
                return entry
        except (OSError, ValueError):  # an unreadable or odd sys.path entry
            continue
    return None


def _defer_to(entry):
    """Replaces this module with the deep_ep package under `entry` (in sys.modules, so the import
    that is running returns that one, and its submodules come from its own directory)."""
    spec = importlib.machinery.PathFinder.find_spec(__name__, [entry])
    module = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(__name__, None)
        raise


_real = None if os.environ.get("EPCOMM_DEEP_EP", "") == "1" else _other_deep_ep()
if _real is not None:
    warnings.warn(f"deep_ep: epcomm's compatibility package ({_HERE}) steps aside for the DeepEP found in "
                  f"{_real}; set EPCOMM_DEEP_EP=1 to use epcomm", stacklevel=2)
    _defer_to(_real)
else:
    try:
        import epcomm as _epcomm
    except ImportError as e:
        raise ImportError(f"deep_ep (epcomm's compatibility package, {_HERE}) needs the epcomm package: install "
                          f"it, or put epcomm's python/ directory on PYTHONPATH ({e})") from e
    if importlib.util.find_spec("deep_ep_cpp") is not None:
        # DeepEP 1.x's native module is installed, so its deep_ep package was probably overwritten by
        # this one in the same directory: say so instead of passing for it silently.
        warnings.warn("deep_ep: DeepEP's native module deep_ep_cpp is installed, but `deep_ep` is epcomm's "
                      "compatibility package; reinstall DeepEP (after `pip uninstall epcomm-deep-ep`) to use it",
                      stacklevel=2)

    from epcomm import Buffer, Config, EventOverlap, topk_idx_t  # noqa: F401 -- the API
    from epcomm.event import EventHandle  # noqa: F401

    from . import buffer, utils  # noqa: F401 -- DeepEP 1.x's submodules, imported as DeepEP's are

    __version__ = f"1.2.1+epcomm.{_epcomm.__version__}"
    __backend__ = "epcomm"
    __all__ = ["Buffer", "Config", "EventOverlap", "EventHandle", "topk_idx_t"]
