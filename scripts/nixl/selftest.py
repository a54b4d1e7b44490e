#!/usr/bin/env python3
"""NIXL self-test: two agents ("a", "b") in one process, UCX backend, DRAM -> DRAM.

a READs b's 8 MiB buffer into its own, then the bytes are compared and b's notification checked.
With --vram the buffers are torch tensors: a's on cuda:0, b's on the last GPU (VRAM -> VRAM).
Exit 0 on success, 1 on a failed check, 2 when nixl_cu13 (or torch for --vram) cannot be imported.

Usage: PYTHONPATH=<printed by scripts/nixl/install> python3 scripts/nixl/selftest.py
           [--mib N] [--reps N] [--vram]
On a slim tree (scripts/nixl/install --gpu) also set the env its README.txt names.
"""
import argparse
import sys
import time


def wait_done(agent, handle, timeout_s):
    """Polls a transfer until DONE; returns the final state ("DONE", "ERR" or "TIMEOUT")."""
    state = agent.transfer(handle)
    deadline = time.monotonic() + timeout_s
    while state == "PROC":
        if time.monotonic() > deadline:
            return "TIMEOUT"
        state = agent.check_xfer_state(handle)
    return state


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=8, help="buffer size in MiB (default 8)")
    ap.add_argument("--reps", type=int, default=20, help="timed READs after the checked one")
    ap.add_argument("--vram", action="store_true", help="GPU buffers (torch) instead of DRAM")
    args = ap.parse_args()

    if args.vram:
        # Before NIXL: UCX's libucm_cuda needs libcudart.so.13, which torch (cu13x) brings.
        try:
            import torch
        except ImportError as e:
            print(f"selftest: --vram needs torch: {e}", file=sys.stderr)
            return 2
        if not torch.cuda.is_available():
            print("selftest: --vram: no CUDA device", file=sys.stderr)
            return 2
    try:
        import numpy as np
        import nixl_cu13
        from nixl_cu13 import nixl_agent, nixl_agent_config
    except ImportError as e:
        print(f"selftest: cannot import nixl_cu13/numpy: {e}", file=sys.stderr)
        return 2

    nbytes = args.mib << 20
    cfg = nixl_agent_config(backends=["UCX"])
    a = nixl_agent("a", cfg)
    b = nixl_agent("b", cfg)
    for ag in (a, b):
        if "UCX" not in ag.backends:
            print(f"selftest: agent {ag.name}: no UCX backend (plugins: {ag.plugin_list})",
                  file=sys.stderr)
            return 1

    if args.vram:
        dev_b = f"cuda:{torch.cuda.device_count() - 1}"
        buf_a = torch.zeros(nbytes, dtype=torch.uint8, device="cuda:0")
        gen = torch.Generator().manual_seed(19)
        buf_b = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen).to(dev_b)
        torch.cuda.synchronize()
        kind = f"VRAM cuda:0 <- {dev_b}"
        reg_a, reg_b = a.register_memory(buf_a), b.register_memory(buf_b)
        local, remote = a.get_xfer_descs(buf_a), b.get_xfer_descs(buf_b)

        def same():
            return torch.equal(buf_a.cpu(), buf_b.cpu())

        def ndiff():
            return int((buf_a.cpu() != buf_b.cpu()).sum())
    else:
        buf_a = np.zeros(nbytes, dtype=np.uint8)
        buf_b = np.random.default_rng(19).integers(0, 256, nbytes, dtype=np.uint8)
        kind = "DRAM->DRAM"
        reg_a = a.register_memory([(buf_a.ctypes.data, nbytes, 0, "")], "DRAM")
        reg_b = b.register_memory([(buf_b.ctypes.data, nbytes, 0, "")], "DRAM")
        local = a.get_xfer_descs([(buf_a.ctypes.data, nbytes, 0)], "DRAM")
        remote = b.get_xfer_descs([(buf_b.ctypes.data, nbytes, 0)], "DRAM")

        def same():
            return np.array_equal(buf_a, buf_b)

        def ndiff():
            return int(np.count_nonzero(buf_a != buf_b))

    # Metadata travels out of band in real use; here both agents live in this process.
    for ag, peer in ((a, b), (b, a)):
        name = ag.add_remote_agent(peer.get_agent_metadata())
        if name not in (peer.name, peer.name.encode()):
            print(f"selftest: {ag.name} loaded metadata of {name!r}, expected {peer.name!r}",
                  file=sys.stderr)
            return 1

    handle = a.initialize_xfer("READ", local, remote, "b", b"selftest")
    backend = a.query_xfer_backend(handle)

    ok = True
    state = wait_done(a, handle, timeout_s=30)
    if state != "DONE":
        print(f"selftest: READ ended in state {state}", file=sys.stderr)
        ok = False
    elif not same():
        print(f"selftest: READ done but {ndiff()} of {nbytes} bytes differ", file=sys.stderr)
        ok = False

    # The READ's notification reaches b through the same backend.
    if ok:
        deadline = time.monotonic() + 10
        notifs = {}
        while time.monotonic() < deadline:
            for k, v in b.get_new_notifs().items():
                notifs.setdefault(k, []).extend(v)
            if notifs.get("a"):
                break
        if notifs.get("a") != [b"selftest"]:
            print(f"selftest: b got notifications {notifs}, expected {{'a': [b'selftest']}}",
                  file=sys.stderr)
            ok = False

    rate = None
    if ok and args.reps > 0:
        # The handle is reposted; the same bytes move again, so time only the transfers.
        t0 = time.perf_counter()
        for _ in range(args.reps):
            state = wait_done(a, handle, timeout_s=30)
            if state != "DONE":
                print(f"selftest: timed READ ended in state {state}", file=sys.stderr)
                ok = False
                break
        dt = time.perf_counter() - t0
        if ok:
            rate = args.reps * nbytes / dt / 1e9
        for _ in range(args.reps):  # drain the timed READs' notifications
            b.get_new_notifs()

    a.release_xfer_handle(handle)
    a.remove_remote_agent("b")
    b.remove_remote_agent("a")
    a.deregister_memory(reg_a)
    b.deregister_memory(reg_b)

    mod = getattr(nixl_cu13, "__file__", "?")
    print(f"nixl_cu13 from {mod}")
    print(f"backend: {backend}")
    if rate is not None:
        print(f"READ {args.mib} MiB {kind} x{args.reps}: {rate:.2f} GB/s")
    print("selftest: " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
