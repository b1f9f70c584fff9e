"""What the Python CPU test files share where pytest may be missing (CI's interpreter has none):
skipping, the `raises` check, and the runner behind `python3 tests/python/test_x.py`."""

import sys

try:
    import pytest
except ImportError:  # run_tests stands in
    pytest = None


class SkipTest(Exception):
    pass


def skip(reason):
    if pytest is not None:
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


def run_tests(namespace, names=None):
    """Runs the test_* functions of `namespace` (a module's globals), or those in `names`, printing
    PASS / SKIP / FAIL per test; exits 1 if any failed."""
    if names is None:
        names = sorted(n for n, f in namespace.items() if n.startswith("test_") and callable(f))
    failed = 0
    for name in names:
        try:
            namespace[name]()
            print(f"PASS {name}")
        except SkipTest as e:
            print(f"SKIP {name}: {e}")
        except Exception as e:  # noqa: BLE001 -- reported
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
    sys.exit(1 if failed else 0)
