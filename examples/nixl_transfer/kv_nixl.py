"""KV blocks of a vmmpp cache moved between processes by NIXL (vmmpp/interop/nixl.hpp, from Python).

One NixlKV per cache: it keeps the cache's committed extents registered with a NIXL agent (one
registration per extent, since UCX exports a physical handle whole; extents given back are
deregistered, new ones registered), describes blocks to a peer (agent metadata, span base, the
blocks' byte pieces), and pulls a peer's blocks into its own (READ, descriptors paired piece by
piece). docs/NIXL.md says when this path runs at link speed and what to use when it does not.
"""
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "capi", "python"))

import vmmpp_kv  # noqa: E402


REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
# Where scripts/nixl/install puts NIXL: for this machine's Python, and the slim tree for the GPU
# machine's (the import picks the one whose compiled bindings match the running Python).
NIXL_DIRS = [os.environ.get("VMMPP_NIXL_DIR", ""), os.path.join(REPO, ".nixl", "host"),
             os.path.join(REPO, "build", "nixl-gpu")]


def import_nixl():
    """nixl_agent and nixl_agent_config from nixl-cu13 (installed, or in one of NIXL_DIRS)."""
    for directory in [None] + [d for d in NIXL_DIRS if d and os.path.isdir(d)]:
        if directory is not None and directory not in sys.path:
            sys.path.insert(0, directory)
        try:
            from nixl_cu13._api import nixl_agent, nixl_agent_config
            return nixl_agent, nixl_agent_config
        except ImportError as e:
            error = e
            for module in [m for m in sys.modules if m.split(".")[0] == "nixl_cu13"]:
                del sys.modules[module]  # a package whose bindings did not load: try the next
            if directory is not None:
                sys.path.remove(directory)
    raise ImportError(f"nixl-cu13 not found (bash scripts/nixl/install): {error}")


class TransferError(RuntimeError):
    """A NIXL transfer ended in ERR or did not end in time."""


class NixlKV:
    """A KVCache whose blocks a NIXL agent named `name` can send and receive."""

    def __init__(self, cache, name, backends=("UCX",)):
        self.cache = cache
        self.name = name
        self.base, self.capacity, self.device = cache.span()
        self.mem_type = "VRAM" if self.device >= 0 else "DRAM"
        self.agent = self.make_agent(name, backends)
        self._registered = {}  # (offset, bytes, commit) -> the agent's registration
        self._remotes = {}  # peer agent name -> the metadata loaded for it
        self.registrations = 0
        self.deregistrations = 0

    @staticmethod
    def make_agent(name, backends=("UCX",)):
        """A NIXL agent named `name` with `backends`."""
        nixl_agent, nixl_agent_config = import_nixl()
        return nixl_agent(name, nixl_agent_config(backends=list(backends)))

    # --- registration ---
    def sync_registration(self):
        """Registers the extents committed since the last call and deregisters those given back
        (or committed again: a new handle at the same address). Returns True if anything changed.
        Call it after the cache grows and before a peer reads, and after frees so that memory the
        pool gave back is not kept by the transfer engine."""
        now = {tuple(e) for e in self.cache.committed_extents()}
        gone = [key for key in self._registered if key not in now]
        new = sorted(now - self._registered.keys())
        for key in gone:
            self.agent.deregister_memory(self._registered.pop(key))
            self.deregistrations += 1
        for offset, nbytes, commit in new:
            descs = self.agent.get_reg_descs([(self.base + offset, nbytes, max(self.device, 0), "")], self.mem_type)
            self._registered[(offset, nbytes, commit)] = self.agent.register_memory(descs)
            self.registrations += 1
        return bool(gone or new)

    def registered_extents(self):
        return sorted(self._registered)

    # --- describing and pulling blocks ---
    def describe(self, blocks):
        """What a peer needs to pull `blocks` (live ids of this cache): a picklable dict."""
        g = self.cache.geometry
        return {
            "agent": self.name,
            "metadata": self.agent.get_agent_metadata(),
            "base": self.base,
            "device": self.device,
            "mem_type": self.mem_type,
            "shape": (g.layers, g.kv_heads, g.head_dim, g.dtype, g.block_tokens, self.cache.layout),
            "pieces": self.cache.block_pieces(list(blocks)),
        }

    def _load_remote(self, remote):
        """Loads (or reloads, when its registrations changed) the peer's agent metadata."""
        name = remote["agent"]
        if self._remotes.get(name) == remote["metadata"]:
            return name
        if name in self._remotes:
            self.agent.remove_remote_agent(name)
            del self._remotes[name]
        loaded = self.agent.add_remote_agent(remote["metadata"])
        loaded = loaded.decode() if isinstance(loaded, bytes) else loaded
        self._remotes[loaded] = remote["metadata"]
        return loaded

    def pair(self, remote, blocks):
        """(local descriptors, remote descriptors) that copy the peer's described blocks into
        `blocks` of this cache, as (address, bytes, device) lists of equal lengths."""
        g = self.cache.geometry
        mine = (g.layers, g.kv_heads, g.head_dim, g.dtype, g.block_tokens, self.cache.layout)
        if tuple(remote["shape"]) != mine:
            raise ValueError(f"block shapes differ: remote {tuple(remote['shape'])}, local {mine}")
        pairs = vmmpp_kv.pair_pieces(self.cache.block_pieces(list(blocks)), remote["pieces"])
        local = [(self.base + lo, n, max(self.device, 0)) for lo, _, n in pairs]
        far = [(remote["base"] + ro, n, max(remote["device"], 0)) for _, ro, n in pairs]
        return local, far

    def prepare_pull(self, remote, blocks):
        """A NIXL READ request (not yet posted) of the peer's described blocks into `blocks`."""
        peer = self._load_remote(remote)
        local, far = self.pair(remote, blocks)
        local_descs = self.agent.get_xfer_descs(local, self.mem_type)
        remote_descs = self.agent.get_xfer_descs(far, remote["mem_type"])
        return self.agent.initialize_xfer("READ", local_descs, remote_descs, peer)

    def run(self, request, timeout_s=600.0):
        """Posts a prepared request and waits for it; raises TransferError on ERR or timeout."""
        state = self.agent.transfer(request)
        deadline = time.monotonic() + timeout_s
        while state == "PROC":
            if time.monotonic() > deadline:
                raise TransferError(f"transfer still in progress after {timeout_s} s")
            state = self.agent.check_xfer_state(request)
        if state != "DONE":
            raise TransferError(f"transfer ended in state {state}")

    def pull(self, remote, blocks, timeout_s=600.0):
        """Copies the peer's described blocks into `blocks` (live ids here, one per remote block,
        in order). Returns the bytes moved."""
        request = self.prepare_pull(remote, blocks)
        try:
            self.run(request, timeout_s)
        finally:
            self.agent.release_xfer_handle(request)
        return sum(n for _, n in remote["pieces"])

    def close(self):
        """Deregisters everything and forgets the peers (the agent goes with the object)."""
        for name in list(self._remotes):
            self.agent.remove_remote_agent(name)
        self._remotes.clear()
        for key in list(self._registered):
            self.agent.deregister_memory(self._registered.pop(key))
            self.deregistrations += 1
