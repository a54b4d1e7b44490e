"""The KV cache binding the serving example runs on, chosen by VMMPP_SERVING_BINDING:

- "ctypes" (the default): vmmpp_kv, ctypes over the C ABI (capi/python; its library from
  VMMPP_KV_LIB), as before;
- "package": the Python package vmmpp (`pip install .` at the repository root), which has the
  same names for what the engine, the benchmark and the tests call (KVCache, PrefixCache,
  HostTier, ProcessBudgetCache, REFUSALS, TierFull, process_budget_stats, remove_process_budget)
  and vmmpp.Error where vmmpp_kv has VmmppError (both with the same .status names).
"""
import os

BINDING = os.environ.get("VMMPP_SERVING_BINDING", "ctypes")
if BINDING == "package":
    import vmmpp as vmmpp_kv

    VmmppError = vmmpp_kv.Error
elif BINDING == "ctypes":
    import vmmpp_kv

    VmmppError = vmmpp_kv.VmmppError
else:
    raise ImportError(f"VMMPP_SERVING_BINDING={BINDING!r}: it is 'ctypes' (vmmpp_kv) or 'package' (vmmpp)")
