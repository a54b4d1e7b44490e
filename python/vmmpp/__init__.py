"""vmmpp: an elastic KV cache for LLM inference engines (Python bindings of the C++ library).

    import vmmpp
    gpu = vmmpp.Budget(40 << 30)                        # one limit for every model in this process
    cache = vmmpp.KVCache(layers=32, kv_heads=8, head_dim=128, max_blocks=65536, dtype="bf16",
                          config="elastic", budget=gpu, model="llama-8b", model_limit_bytes=24 << 30)
    seq = cache.add_sequence()
    first = cache.append(seq, 1000)                     # maps pages as needed
    slots = cache.slot_mapping(seq)                     # array('q'): block * block_tokens + offset
    k0 = torch.from_dlpack(cache.key(0))                # [max_blocks, block_tokens, kv_heads, head_dim]
    cache.free(seq, stream=torch.cuda.current_stream()) # pages back once the stream gets there

config="host" runs the same code on CPU memory (no GPU needed; numpy.from_dlpack reads it).
Errors are vmmpp.Error subclasses carrying vmmpp's numbers (OverQuota.requested, .limit, ...);
streams are None, an int (cudaStream_t) or an object with .cuda_stream. An exported tensor is
a view of the cache: only blocks of live sequences are backed by memory.
"""
from ._vmmpp import (  # noqa: F401  (the public API)
    Budget,
    CacheAsleep,
    CudaError,
    CudaUnavailable,
    Error,
    Eviction,
    Geometry,
    HostTier,
    IncompatibleSegment,
    InvalidArgument,
    KVCache,
    KVTensor,
    ModelInUse,
    NoSuchSegment,
    OutOfBlocks,
    OutOfMemory,
    OutOfSequenceSlots,
    OverQuota,
    PrefixCache,
    ProcessBudget,
    RetiredMemory,
    TierFull,
    UnknownModel,
    UntrustedSegment,
    budget_config_names,
    config_names,
    copy_blocks,
    layout_names,
    process_budget_layout_names,
    remove_process_budget,
    stats_json,
)

__version__ = "0.1.0"

KEY, VALUE = 0, 1
DTYPES = ("f32", "f16", "bf16", "fp8_e4m3", "fp8_e5m2")
# DLPack device types (DLDeviceType), what dlpack_device() returns first.
KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_CUDA_MANAGED = 1, 2, 3, 13
# The names, from the C++ lists (vmmpp::named_configs, vmmpp::kv_layouts), in their order.
CONFIGS = tuple(config_names().split(","))
BUDGET_CONFIGS = tuple(budget_config_names().split(","))
LAYOUTS = tuple(layout_names().split(","))
DEFAULT_LAYOUT = LAYOUTS[0]
# Refusals of memory an engine answers by preempting or waiting (as vmmpp_kv.REFUSALS).
REFUSALS = (OutOfBlocks, OverQuota, OutOfMemory)


class ProcessBudgetCache(KVCache):
    """A KVCache charged to model `model` (limit model_limit_bytes) of the cross-process budget
    `budget_name` (created with global_limit_bytes, default model_limit_bytes, if none exists;
    joined otherwise): vmmpp_kv.ProcessBudgetCache's arguments. Same as
    KVCache(budget=ProcessBudget.create_or_open(...), model=..., model_limit_bytes=...)."""

    def __init__(self, *, budget_name, model, model_limit_bytes, global_limit_bytes=0, config="elastic", **kwargs):
        budget = ProcessBudget.create_or_open(budget_name, global_limit_bytes or model_limit_bytes)
        super().__init__(config=config, budget=budget, model=model, model_limit_bytes=model_limit_bytes, **kwargs)


def process_budget_stats(budget_name):
    """The process budget `budget_name`'s figures over every process: {limit, committed, peak,
    denied, over, models: [...]} (NoSuchSegment if there is none)."""
    return ProcessBudget.open(budget_name).stats()
