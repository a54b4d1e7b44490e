"""What the two-process test and the benchmark share: a message channel over a Unix socket, the
role processes' launch, and a test pattern written and checked through DLPack views of a cache
(PyTorch for GPU caches, NumPy for host ones)."""
import ctypes
import os
import pickle
import socket
import struct
import subprocess
import sys

SKIP = 77  # ctest's SKIP_RETURN_CODE


class Channel:
    """Pickled messages, length-prefixed, over a connected socket."""

    def __init__(self, fd):
        self.sock = socket.socket(fileno=fd)

    def send(self, obj):
        data = pickle.dumps(obj)
        self.sock.sendall(struct.pack("<Q", len(data)) + data)

    def recv(self):
        (n,) = struct.unpack("<Q", self._exactly(8))
        return pickle.loads(self._exactly(n))

    def _exactly(self, n):
        chunks = []
        while n > 0:
            chunk = self.sock.recv(min(n, 1 << 20))
            if not chunk:
                raise EOFError("the peer process closed the channel")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)


def allow_peer_to_take_descriptors():
    """Lets a sibling process take this process's file descriptors with pidfd_getfd (UCX 1.22's
    cuda_ipc imports VMM handles that way): under Yama ptrace_scope 1 only an ancestor may,
    unless the process names a tracer (PR_SET_PTRACER_ANY). No effect without Yama."""
    if os.path.exists("/proc/sys/kernel/yama/ptrace_scope"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(0x59616D61, ctypes.c_ulong(-1 & 0xFFFFFFFFFFFFFFFF), 0, 0, 0)  # PR_SET_PTRACER, ANY


def run_roles(script, roles, common_args, timeout_s=900):
    """Runs `script --role R --ctl-fd F --pages-fd G common_args` for the two roles, connected by a
    control socket pair and a page socket pair. Returns the exit codes, in role order."""
    ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pages = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    procs = []
    for i, role in enumerate(roles):
        fds = (ctl[i].fileno(), pages[i].fileno())
        cmd = [sys.executable, script, "--role", role, "--ctl-fd", str(fds[0]), "--pages-fd", str(fds[1])]
        procs.append(subprocess.Popen(cmd + list(common_args), pass_fds=fds))
    for s in (*ctl, *pages):
        s.close()
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout_s))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


class Arrays:
    """Views of a cache's blocks as int16 arrays (bit patterns, whatever the element type), a
    deterministic pattern per (tag, layer, part), and exact comparison."""

    def __init__(self, cache):
        self.cache = cache
        self.on_gpu = cache.span()[2] >= 0
        if self.on_gpu:
            import torch
            self.xp = torch
            self.device = torch.device("cuda", cache.span()[2])
        else:
            import numpy
            self.xp = numpy
        g = cache.geometry
        self.parts = 1 if cache.layout == "mla" else 2
        self.layers = g.layers
        self._views = {}

    def view(self, layer, part):
        """[max_blocks, block_tokens, kv_heads, head_dim] (layout order) as int16, cached."""
        key = (layer, part)
        if key not in self._views:
            self._views[key] = self.xp.from_dlpack(self.cache.tensor(layer, part)).view(self.xp.int16)
        return self._views[key]

    def pattern(self, tag, layer, part):
        """One block's worth of int16 values for (tag, layer, part)."""
        shape = tuple(self.view(layer, part).shape[1:])
        n = 1
        for d in shape:
            n *= d
        if self.on_gpu:
            i = self.xp.arange(n, dtype=self.xp.int64, device=self.device)
        else:
            i = self.xp.arange(n, dtype=self.xp.int64)
        v = (i * 40503 + tag * 2654435761 + layer * 97 + part * 131071) % 65536 - 32768
        return v.to(self.xp.int16).reshape(shape) if self.on_gpu else v.astype(self.xp.int16).reshape(shape)

    def fill(self, blocks, tag_of):
        """Writes pattern(tag_of(i), layer, part) into block blocks[i], every layer and part."""
        for layer in range(self.layers):
            for part in range(self.parts):
                view = self.view(layer, part)
                for i, b in enumerate(blocks):
                    view[b] = self.pattern(tag_of(i), layer, part)
        self.synchronize()

    def mismatches(self, blocks, tag_of):
        """Blocks (index in `blocks`) whose bytes differ from the pattern, anywhere."""
        bad = set()
        for layer in range(self.layers):
            for part in range(self.parts):
                view = self.view(layer, part)
                for i, b in enumerate(blocks):
                    same = self.xp.equal(view[b], self.pattern(tag_of(i), layer, part)) if self.on_gpu else \
                        self.xp.array_equal(view[b], self.pattern(tag_of(i), layer, part))
                    if not same:
                        bad.add(i)
        return sorted(bad)

    def synchronize(self):
        if self.on_gpu:
            self.xp.cuda.synchronize(self.device)
