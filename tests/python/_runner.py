"""What the Python CPU test files share where pytest may be missing (CI's interpreter has none):
skipping, the `raises` check, and the runner behind `python3 tests/python/test_x.py` (one file) and
`python3 tests/python/_runner.py tests/python/test_cpu_*.py` (several)."""

import os
import sys

try:
    import pytest
except ImportError:  # run_tests stands in
    pytest = None


class SkipTest(Exception):
    pass


def skip(reason):
    # pytest's Skipped is a BaseException: only under pytest (which sets PYTEST_CURRENT_TEST while a
    # test runs), never in the runner below, even where pytest is installed.
    if pytest is not None and "PYTEST_CURRENT_TEST" in os.environ:
        pytest.skip(reason)
    raise SkipTest(reason)


def raises(exc_type, fn, *fragments):
    """Calls fn; it must raise exc_type with every fragment in its message. Returns the exception."""
    try:
        fn()
    except exc_type as e:
        for f in fragments:
            assert f in str(e), f"{exc_type.__name__} '{e}' does not mention '{f}'"
        return e
    raise AssertionError(f"no {exc_type.__name__} raised")


def _run(namespace, names=None, prefix=""):
    """Runs the test_* functions of `namespace`, or those in `names`, printing PASS / SKIP / FAIL per
    test (names after `prefix`); returns how many failed. A test that takes pytest parameters names
    its call without them in `runner_call` (e.g. every case in turn)."""
    if names is None:
        names = sorted(n for n, f in namespace.items() if n.startswith("test_") and callable(f))
    failed = 0
    for name in names:
        try:
            fn = namespace[name]
            getattr(fn, "runner_call", fn)()
            print(f"PASS {prefix}{name}")
        except SkipTest as e:
            print(f"SKIP {prefix}{name}: {e}")
        except Exception as e:  # noqa: BLE001 -- reported
            failed += 1
            print(f"FAIL {prefix}{name}: {type(e).__name__}: {e}")
    return failed


def run_tests(namespace, names=None):
    """Runs the test_* functions of `namespace` (a module's globals), or those in `names`, printing
    PASS / SKIP / FAIL per test; exits 1 if any failed."""
    sys.exit(1 if _run(namespace, names) else 0)


def run_files(paths):
    """Runs the test_* functions of every test file in `paths`, one after the other in one
    interpreter; exits 1 if any failed."""
    import importlib.util
    import os

    failed = 0
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        failed += _run(vars(module), prefix=f"{name}::")
    sys.exit(1 if failed else 0)


# Several test files without pytest: python3 tests/python/_runner.py tests/python/test_cpu_*.py
if __name__ == "__main__":
    import _runner  # the module the test files import: its SkipTest is the one they raise

    _runner.run_files(sys.argv[1:])
