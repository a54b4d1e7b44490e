"""What the serving example's tests share: ctest's skip code, and torch for the device asked for."""
SKIP = 77  # ctest's SKIP_RETURN_CODE for these tests


def torch_on(device_name):
    """torch, with matmuls in full f32 (no TF32: greedy tokens compare exactly), or None after
    saying why the test skips: no torch, or no CUDA device when `device_name` is "cuda"."""
    try:
        import torch
    except ImportError:
        print("no torch: skipping")
        return None
    if device_name == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: skipping")
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch
