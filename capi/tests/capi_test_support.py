"""What the C ABI's test scripts share: the module under test, and NumPy with DLPack or a skip.

The scripts run as `python3 capi/tests/<script>.py`, so this directory is on sys.path.
"""
import os
import sys

SKIP = 77  # ctest's SKIP_RETURN_CODE for these tests


def import_vmmpp_kv():
    """capi/python/vmmpp_kv.py, or the one in VMMPP_KV_PYTHON_DIR (an installed copy)."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.environ.get("VMMPP_KV_PYTHON_DIR", os.path.join(here, "..", "python")))
    import vmmpp_kv
    return vmmpp_kv


def numpy_with_dlpack():
    """NumPy >= 1.22 (numpy.from_dlpack); without it the test exits SKIP, which ctest reports skipped."""
    try:
        import numpy as np
    except ImportError:
        print("numpy is not installed: skipping (python3 -m pip install numpy)")
        sys.exit(SKIP)
    if not hasattr(np, "from_dlpack"):
        print(f"numpy {np.__version__} has no from_dlpack (needs >= 1.22): skipping")
        sys.exit(SKIP)
    return np
