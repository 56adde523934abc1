#!/usr/bin/python3
"""Runs the Python module's tests (ctest: python_tests). Exits 77, ctest's "skipped", with the
reason when the module was not built (argv[1] says why) or PyTorch is missing; never passes
without running them."""

import os
import sys
import unittest


def main():
    """Runs every test_*.py here (spawned processes import this file again: hence main())."""
    if len(sys.argv) > 1 and sys.argv[1]:
        print(f"python_tests skipped: {sys.argv[1]}")
        sys.exit(77)
    try:
        import torch  # noqa: F401
    except ImportError:
        print(f"python_tests skipped: PyTorch is missing for {sys.executable} (Debian: apt-get install python3-torch)")
        sys.exit(77)

    here = os.path.dirname(os.path.abspath(__file__))
    suite = unittest.defaultTestLoader.discover(here, pattern="test_*.py")
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    sys.exit(0 if result.wasSuccessful() and result.testsRun > 0 else 1)


if __name__ == "__main__":
    main()
