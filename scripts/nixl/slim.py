#!/usr/bin/env python3
"""Slim copy of the nixl-cu13 wheel: just what `import nixl_cu13` and an agent with the UCX backend
need, in the wheel's own layout (its RPATHs are $ORIGIN-relative, so no LD_LIBRARY_PATH).

Usage:
  slim.py WHEEL DIR [--ucx UCX_PREFIX]   build DIR (empty, absent or an earlier slim tree)
  slim.py --check DIR                    load every library of DIR (ctypes, RTLD_NOW); the
                                         CUDA modules only where libcuda etc. load

Normally run through scripts/nixl/install. The library set is not a list: it is the DT_NEEDED
closure of the roots below, read from the ELF files (a NEEDED name found through the object's
RPATH/RUNPATH inside the wheel is kept; one that is not in the wheel is a system library).
"""
import argparse
import ctypes
import os
import posixpath
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import zipfile

MESON = ".nixl_cu13.mesonpy.libs"  # NIXL's own libraries and plugins/
LIBS = "nixl_cu13.libs"  # auditwheel's bundled third-party libraries (hashed names)
UCX_MODDIR = LIBS + "/ucx"
PKG = "nixl_cu13"
MARKER = "Slim copy of the nixl-cu13 wheel"  # first line of README.txt: DIR may be replaced
MAX_BYTES = 40 << 20

# Roots of the closure. libnixl_capi is NIXL's C API (nothing else needs it; C callers may).
ROOT_MESON = ["libnixl.so", "libnixl_build.so", "libnixl_common.so", "libserdes.so",
              "libstream.so", "libnixl_capi.so", "plugins/libplugin_UCX.so"]
UCX_CORE = re.compile(r"^lib(ucp|ucs|uct|ucm)-[0-9a-f]{8}\.so(\.\d+)*$")
UCX_MODULES = ("libuct_cuda", "libucm_cuda", "libuct_cma")  # cuda_copy/cuda_ipc/gdr_copy, cma
CUDA_MODULES = ("libuct_cuda", "libucm_cuda")  # need libcuda.so.1 to load
LICENSES = re.compile(r"^nixl_cu13-[^/]+\.dist-info/licenses/(.+/)?([^/]+)$")

# --ucx: file in the UCX prefix -> which of the wheel's files it replaces.
UCX_REPLACE_CORE = {"libucp.so.0": "ucp", "libucs.so.0": "ucs", "libuct.so.0": "uct",
                    "libucm.so.0": "ucm"}
UCX_REPLACE_MOD = ("libuct_cuda.so.0", "libucm_cuda.so.0", "libuct_cma.so.0")


# ---------------------------------------------------------------- ELF (64-bit little-endian)

DT_NEEDED, DT_SONAME, DT_RPATH, DT_RUNPATH = 1, 14, 15, 29
SHT_DYNAMIC, SHT_DYNSYM = 6, 11
SHT_GNU_VERDEF, SHT_GNU_VERNEED = 0x6FFFFFFD, 0x6FFFFFFE


class Elf:
    """The dynamic section of a shared object: NEEDED, SONAME, RPATH/RUNPATH, and where every
    .dynstr string that something references starts (to rewrite a RUNPATH in place safely)."""

    def __init__(self, data, name="?"):
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise ValueError(f"{name}: not a 64-bit little-endian ELF file")
        self.name = name
        shoff, = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
        if shoff == 0 or shnum == 0:
            raise ValueError(f"{name}: no section headers")
        secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
        dyn = [s for s in secs if s[1] == SHT_DYNAMIC]
        if len(dyn) != 1:
            raise ValueError(f"{name}: {len(dyn)} dynamic sections")
        _, _, _, _, off, size, link, _, _, _ = dyn[0]
        self.dynstr_off = secs[link][4]
        self.dynstr_size = secs[link][5]
        self.entries = []  # (tag, value, file offset of the entry)
        for pos in range(off, off + size, 16):
            tag, val = struct.unpack_from("<qQ", data, pos)
            if tag == 0:
                break
            self.entries.append((tag, val, pos))
        self._data = data
        self.needed = [self.str(v) for t, v, _ in self.entries if t == DT_NEEDED]
        sonames = [self.str(v) for t, v, _ in self.entries if t == DT_SONAME]
        self.soname = sonames[0] if sonames else None
        paths = [(t, self.str(v)) for t, v, _ in self.entries if t in (DT_RPATH, DT_RUNPATH)]
        self.rpath = [p for t, p in paths if t == DT_RPATH]
        self.runpath = [p for t, p in paths if t == DT_RUNPATH]
        self.str_refs = self._string_refs(secs, link)

    def str(self, off):
        end = self._data.index(b"\0", self.dynstr_off + off)
        return self._data[self.dynstr_off + off:end].decode()

    def _string_refs(self, secs, dynstr_index):
        """Offsets into .dynstr used by the dynamic section, symbols and version records."""
        d = self._data
        refs = [(v, ("dynamic", t)) for t, v, _ in self.entries
                if t in (DT_NEEDED, DT_SONAME, DT_RPATH, DT_RUNPATH)]
        for _, typ, _, _, off, size, link, info, _, entsize in secs:
            if link != dynstr_index:
                continue
            if typ == SHT_DYNSYM:
                for pos in range(off, off + size, entsize or 24):
                    refs.append((struct.unpack_from("<I", d, pos)[0], ("dynsym",)))
            elif typ == SHT_GNU_VERNEED:
                pos = off
                for _ in range(info):
                    _, cnt, vfile, aux, nxt = struct.unpack_from("<HHIII", d, pos)
                    refs.append((vfile, ("verneed",)))
                    apos = pos + aux
                    for _ in range(cnt):
                        _, _, _, vname, anext = struct.unpack_from("<IHHII", d, apos)
                        refs.append((vname, ("vernaux",)))
                        apos += anext
                    pos += nxt
            elif typ == SHT_GNU_VERDEF:
                pos = off
                for _ in range(info):
                    _, _, _, cnt, _, aux, nxt = struct.unpack_from("<HHHHIII", d, pos)
                    apos = pos + aux
                    for _ in range(cnt):
                        vname, anext = struct.unpack_from("<II", d, apos)
                        refs.append((vname, ("verdaux",)))
                        apos += anext
                    pos += nxt
        return refs


def read_elf(path):
    with open(path, "rb") as f:
        return Elf(f.read(), path)


def set_runpath_in_place(path, new):
    """Overwrites the file's RPATH or RUNPATH string with `new` (chrpath's way: the string may
    only get shorter, padded with NULs, and no other reference may share its bytes)."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    elf = Elf(bytes(data), path)
    ents = [(t, v) for t, v, _ in elf.entries if t in (DT_RPATH, DT_RUNPATH)]
    if len(ents) != 1:
        raise RuntimeError(f"{path}: {len(ents)} RPATH/RUNPATH entries, need exactly one to rewrite")
    tag, off = ents[0]
    old = elf.str(off)
    if old == new:
        return old
    if len(new) > len(old):
        raise RuntimeError(f"{path}: new RUNPATH '{new}' longer than the old '{old}'")
    shared = [(o, who) for o, who in elf.str_refs
              if off <= o <= off + len(old) and not (o == off and who == ("dynamic", tag))]
    if shared:
        raise RuntimeError(f"{path}: RUNPATH string '{old}' shares bytes with {shared[:3]}")
    start = elf.dynstr_off + off
    data[start:start + len(old)] = new.encode().ljust(len(old), b"\0")
    with open(path, "r+b") as f:
        f.write(data)
    return old


def is_elf_so(name):
    base = posixpath.basename(name)
    return re.search(r"\.so(\.\d+)*$", base) is not None or ".so." in base


# ---------------------------------------------------------------- building the slim tree

def search_dirs(member_dir, elf):
    """The object's RPATH/RUNPATH entries that point inside the wheel ($ORIGIN-relative)."""
    dirs = []
    for entry in elf.rpath + elf.runpath:
        for p in entry.split(":"):
            if p.startswith("$ORIGIN") or p.startswith("${ORIGIN}"):
                p = p.replace("${ORIGIN}", member_dir).replace("$ORIGIN", member_dir)
                dirs.append(posixpath.normpath(p))
    return dirs


def closure(zf, roots):
    """DT_NEEDED closure of `roots` (wheel member names) inside the wheel: (members, system)."""
    names = set(zf.namelist())
    by_base = {}
    for n in names:
        by_base.setdefault(posixpath.basename(n), []).append(n)
    keep, system, todo = set(), {}, list(roots)
    while todo:
        m = todo.pop()
        if m in keep:
            continue
        keep.add(m)
        elf = Elf(zf.read(m), m)
        for need in elf.needed:
            found = next((c for c in (posixpath.join(d, need)
                                      for d in search_dirs(posixpath.dirname(m), elf))
                          if c in names), None)
            if found:
                todo.append(found)
            elif need in by_base:
                raise RuntimeError(f"{m} needs {need}, which the wheel has at {by_base[need]} but "
                                   f"not on its RPATH {elf.rpath + elf.runpath}")
            else:
                system.setdefault(need, set()).add(posixpath.basename(m))
    return keep, system


def choose_members(zf):
    names = zf.namelist()
    roots = [n for n in names if n.startswith(PKG + "/") and n.endswith(".so")]
    roots += [f"{MESON}/{r}" for r in ROOT_MESON]
    roots += [n for n in names if posixpath.dirname(n) == LIBS
              and UCX_CORE.match(posixpath.basename(n))]
    roots += [n for n in names if posixpath.dirname(n) == UCX_MODDIR
              and posixpath.basename(n).split(".")[0] in UCX_MODULES and is_elf_so(n)
              and not n.endswith(".la")]
    missing = [r for r in roots if r not in names]
    if missing:
        raise RuntimeError(f"wheel lacks {missing}")
    libs, system = closure(zf, roots)
    python = [n for n in names if n.startswith(PKG + "/") and not n.endswith("/")]
    return sorted(set(python) | libs), system


def strip_this(member):
    """Third-party libraries only: NIXL's own files and UCX stay byte-identical to the wheel."""
    return posixpath.dirname(member) == LIBS and not UCX_CORE.match(posixpath.basename(member))


def ucx_version(paths):
    """UCX's version string (UCP_VERSION_STRING lives in libucp; libucs has none)."""
    for p in paths:
        with open(p, "rb") as f:
            m = re.findall(rb"(?<![0-9.])(1\.\d{1,2}\.\d{1,3})\0", f.read())
        if m:
            return m[0].decode()
    return None


def tree_size(root):
    total = 0
    for dp, _, fns in os.walk(root):
        for fn in fns:
            p = os.path.join(dp, fn)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def replace_ucx(tmp, prefix, log):
    """Puts the UCX of `prefix` in place of the wheel's, under the wheel's file names, plus
    soname links (libucp.so.0 ...) that the prefix's own libraries name in DT_NEEDED."""
    libdir = os.path.join(prefix, "lib")
    libs_dir = os.path.join(tmp, LIBS)
    hashed = {}
    for fn in os.listdir(libs_dir):
        m = UCX_CORE.match(fn)
        if m:
            hashed[m.group(1)] = fn
    plan = []
    for src, key in UCX_REPLACE_CORE.items():
        plan.append((os.path.join(libdir, src), os.path.join(libs_dir, hashed[key]), "$ORIGIN"))
    for src in UCX_REPLACE_MOD:
        dst = [fn for fn in os.listdir(os.path.join(tmp, UCX_MODDIR))
               if fn.split(".")[0] == src.split(".")[0]]
        if len(dst) != 1:
            raise RuntimeError(f"slim tree has {dst} for {src}")
        plan.append((os.path.join(libdir, "ucx", src), os.path.join(tmp, UCX_MODDIR, dst[0]),
                     "$ORIGIN/.."))
    for src, _, _ in plan:
        if not os.path.isfile(src):
            raise RuntimeError(f"--ucx {prefix}: {src} is missing")
    links = []
    for src, dst, runpath in plan:
        shutil.copyfile(src, dst)  # follows the prefix's symlinks
        os.chmod(dst, 0o755)
        subprocess.run(["strip", "--strip-unneeded", dst], check=True)
        elf = read_elf(dst)
        if elf.rpath or elf.runpath:
            old = set_runpath_in_place(dst, runpath)
            log.append(f"  {os.path.relpath(dst, tmp)} <- {src} (RUNPATH {old} -> {runpath})")
        else:
            log.append(f"  {os.path.relpath(dst, tmp)} <- {src} (no RUNPATH; needs {elf.needed})")
        if elf.soname and elf.soname != os.path.basename(dst):
            links.append((os.path.join(os.path.dirname(dst), elf.soname), os.path.basename(dst)))
    for link, target in links:
        os.symlink(target, link)
        log.append(f"  {os.path.relpath(link, tmp)} -> {target}")
    # Every UCX library the new files need by soname must now be in the tree.
    have = set(os.listdir(libs_dir))
    for _, dst, _ in plan:
        for need in read_elf(dst).needed:
            if re.match(r"^libuc[pstm]\.so", need) and need not in have:
                raise RuntimeError(f"{dst} needs {need}, not in {libs_dir}")
    level = ucp_thread_level(os.path.join(libs_dir, hashed["ucp"]))
    if level != "MULTI":
        raise RuntimeError(f"--ucx {prefix}: its libucp supports thread level {level}; NIXL's UCX "
                           "backend needs MULTI (\"UCX library does not support multi-threading\"):"
                           " configure UCX with --enable-mt")
    log.append(f"  libucp thread level: {level} (ucp_lib_query)")
    return ucx_version([os.path.join(libdir, "libucs.so.0"), os.path.join(libdir, "libucp.so.0")])


def ucp_thread_level(libucp):
    """libucp's max thread level from ucp_lib_query, asked in a fresh process."""
    code = (
        "import ctypes, sys\n"
        "class A(ctypes.Structure):\n"
        "    _fields_ = [('field_mask', ctypes.c_uint64), ('max_thread_level', ctypes.c_int)]\n"
        "lib = ctypes.CDLL(sys.argv[1])\n"
        "a = A(1, -1)  # UCP_LIB_ATTR_FIELD_MAX_THREAD_LEVEL\n"
        "rc = lib.ucp_lib_query(ctypes.byref(a))\n"
        "print(rc, a.max_thread_level)\n")
    r = subprocess.run([sys.executable, "-c", code, libucp], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ucp_lib_query on {libucp} failed: {r.stderr.strip()}")
    rc, level = map(int, r.stdout.split())
    if rc != 0:
        raise RuntimeError(f"ucp_lib_query on {libucp} returned status {rc}")
    return {0: "SINGLE", 1: "SERIALIZED", 2: "MULTI"}.get(level, str(level))


README = """{marker} ({wheel}), built by
scripts/nixl/install --gpu: just what `import nixl_cu13` and a nixl_agent with the UCX backend need.

Use:   PYTHONPATH=<this dir>   (python3.12; numpy in the environment, torch for VRAM tensors)
Env:   NIXL_PLUGIN_DIR=<this dir>/.nixl_cu13.mesonpy.libs/plugins
       UCX_MODULE_DIR=<this dir>/nixl_cu13.libs/ucx   (stops UCX from also scanning its built-in
                                                        module dir for foreign modules)
No LD_LIBRARY_PATH: RPATH/RUNPATH are $ORIGIN-relative, the wheel's layout is kept.
Check: python3 scripts/nixl/slim.py --check <this dir>; self-test: scripts/nixl/selftest.py

Layout:
  nixl_cu13/                   the Python package (_bindings, _utils: cpython-312)
  .nixl_cu13.mesonpy.libs/     NIXL's libraries; plugins/ holds libplugin_UCX.so only
  nixl_cu13.libs/              UCX core (libucp/libucs/libuct/libucm) + the DT_NEEDED closure of
                               the above (grpc, etcd, protobuf, absl, ...: libnixl links them)
  nixl_cu13.libs/ucx/          UCX modules libuct_cuda (cuda_copy, cuda_ipc, gdr_copy),
                               libucm_cuda, libuct_cma; no IB/RDMA modules
  licenses/                    from the wheel's dist-info
UCX: {ucx}
Stripped (--strip-unneeded): the third-party libraries in nixl_cu13.libs/ other than UCX.
System libraries still needed (DT_NEEDED not in the wheel):
{system}
Size: {size:.1f} MiB in {files} files.
"""


def build(wheel, dest, ucx_prefix):
    dest = os.path.normpath(dest)
    if os.path.exists(dest):
        readme = os.path.join(dest, "README.txt")
        ours = os.path.isfile(readme) and open(readme).readline().startswith(MARKER)
        if os.listdir(dest) and not ours:
            sys.exit(f"slim.py: {dest} exists and is not a slim tree (no README.txt of ours); "
                     "not replacing it")
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".nixl-slim-", dir=parent)
    try:
        with zipfile.ZipFile(wheel) as zf:
            members, system = choose_members(zf)
            licenses = [(n, LICENSES.match(n).group(2)) for n in zf.namelist()
                        if LICENSES.match(n)]
            stripped = 0
            for m in members:
                out = os.path.join(tmp, m)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with zf.open(m) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                mode = (zf.getinfo(m).external_attr >> 16) & 0o777
                os.chmod(out, mode or (0o755 if is_elf_so(m) else 0o644))
                if strip_this(m):
                    subprocess.run(["strip", "--strip-unneeded", out], check=True)
                    stripped += 1
            os.makedirs(os.path.join(tmp, "licenses"))
            for n, base in licenses:
                with zf.open(n) as src, open(os.path.join(tmp, "licenses", base), "wb") as dst:
                    shutil.copyfileobj(src, dst)
        ucx_files = sorted(os.path.join(tmp, LIBS, f) for f in os.listdir(os.path.join(tmp, LIBS))
                           if UCX_CORE.match(f))
        ucx_note = (f"the wheel's own, version {ucx_version(ucx_files)}; byte-identical to the wheel")
        log = []
        if ucx_prefix:
            ver = replace_ucx(tmp, ucx_prefix, log)
            ucx_note = (f"REPLACED by the UCX {ver} install at {os.path.abspath(ucx_prefix)} "
                        "(stripped, RUNPATH set to $ORIGIN / $ORIGIN/.. in place), under the "
                        "wheel's file names:\n" + "\n".join(log) + "\n"
                        "  (libucp.so.0 etc.: the soname links its libraries need by DT_NEEDED;"
                        " ucx/*.so.0 links keep the modules found when libucs is loaded under"
                        " its soname)")
        size = tree_size(tmp)
        nfiles = sum(len(f) for _, _, f in os.walk(tmp))
        cuda = {k for k, v in system.items() if all(u.split(".")[0] in CUDA_MODULES for u in v)}
        sysl = textwrap.fill(", ".join(sorted(set(system) - cuda)) + "; for the CUDA modules "
                             "only: " + ", ".join(sorted(cuda)), width=98,
                             initial_indent=" " * 2, subsequent_indent=" " * 2)
        with open(os.path.join(tmp, "README.txt"), "w") as f:
            f.write(README.format(marker=MARKER, wheel=os.path.basename(wheel), ucx=ucx_note,
                                  system=sysl, size=size / 2**20, files=nfiles + 1))
        if size > MAX_BYTES:
            sys.exit(f"slim.py: tree is {size / 2**20:.1f} MiB, over the {MAX_BYTES >> 20} MiB limit")
        os.chmod(tmp, 0o755)  # mkdtemp made it 0700
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.rename(tmp, dest)
        tmp = None
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"slim tree: {dest}  {size / 2**20:.1f} MiB ({size} bytes), {nfiles + 1} files, "
          f"{stripped} libraries stripped")
    if log:
        print("UCX replaced:\n" + "\n".join(log))
    print(f"system libraries it needs: {', '.join(sorted(system))}")
    print(f"env: PYTHONPATH={dest} NIXL_PLUGIN_DIR={dest}/{MESON}/plugins "
          f"UCX_MODULE_DIR={dest}/{UCX_MODDIR}")


# ---------------------------------------------------------------- --check

def tree_libs(root):
    """Regular shared-library files of the tree, and its symlinks (aliases)."""
    files, links = [], []
    for dp, dns, fns in os.walk(root):
        dns.sort()
        for fn in sorted(fns):
            p = os.path.join(dp, fn)
            if not is_elf_so(fn):
                continue
            (links if os.path.islink(p) else files).append(p)
    return files, links


def dependency_order(files):
    """Files sorted so that every file comes after the tree files it needs."""
    elves = {p: read_elf(p) for p in files}
    provides = {}
    for p, e in elves.items():
        provides.setdefault(os.path.basename(p), p)
        if e.soname:
            provides.setdefault(e.soname, p)
    order, state = [], {}

    def visit(p):
        if state.get(p) == 2:
            return
        if state.get(p) == 1:
            return  # a cycle: the loader copes, so does this order
        state[p] = 1
        for need in elves[p].needed:
            dep = provides.get(need)
            if dep and dep != p:
                visit(dep)
        state[p] = 2
        order.append(p)

    for p in sorted(files):
        visit(p)
    return order, elves


def mapped_foreign(root, tree_sonames):
    """Shared objects mapped in this process from outside `root` whose SONAME a tree file also
    has: the tree's RPATHs did not win (a second UCX, say)."""
    root = os.path.realpath(root)
    bad = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 6 or not parts[5].startswith("/"):
                continue
            path = parts[5].strip()
            if os.path.realpath(path).startswith(root + os.sep) or not is_elf_so(path):
                continue
            try:
                so = read_elf(path).soname
            except (OSError, ValueError):
                continue
            if so in tree_sonames:
                bad.add(f"{path} (soname {so})")
    return sorted(bad)


def check_one(root, path):
    """Child mode: load one library alone (its own RPATHs only) and report foreign mappings."""
    try:
        ctypes.CDLL(path, mode=os.RTLD_NOW)
    except OSError as e:
        print(f"ERR {e}")
        return 1
    foreign = mapped_foreign(root, set(os.environ.get("SLIM_TREE_SONAMES", "").split(":")) - {""})
    if foreign:
        print("ERR loaded from outside the tree: " + "; ".join(foreign))
        return 1
    print("OK")
    return 0


def check(root):
    """Loads every library of the tree: (1) all in this process in dependency order with
    RTLD_NOW|RTLD_GLOBAL, as the real import does; (2) each alone in a fresh process with
    RTLD_NOW, so that each must find its own dependencies through its own RPATH/RUNPATH. Both
    also fail when a library the tree provides was mapped from elsewhere."""
    root = os.path.normpath(root)
    files, links = tree_libs(root)
    if not files:
        sys.exit(f"slim.py --check: no shared libraries under {root}")
    order, elves = dependency_order(files)
    sonames = {e.soname for e in elves.values() if e.soname}
    provides = {}
    for p, e in elves.items():
        provides.setdefault(os.path.basename(p), p)
        if e.soname:
            provides.setdefault(e.soname, p)
    users = {p: set() for p in order}  # p -> tree files that need p, transitively
    for p in order:
        for need in elves[p].needed:
            if provides.get(need) not in (None, p):
                users[provides[need]].add(p)
    direct = {p: set(u) for p, u in users.items()}
    changed = True
    while changed:
        changed = False
        for p in order:
            more = set().union(*(users[u] for u in users[p])) - users[p] - {p}
            if more:
                users[p] |= more
                changed = True

    def system_ok(name):
        try:
            ctypes.CDLL(name, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
            return True
        except OSError:
            return False

    # The CUDA modules load where their driver/runtime libraries do (a GPU machine).
    cuda_missing = {}
    for p in order:
        if os.path.basename(p).split(".")[0] in CUDA_MODULES:
            need = [n for n in elves[p].needed if n.startswith(("libcuda", "libnvidia", "libcudart"))]
            missing = [n for n in need if not system_ok(n)]
            if missing:
                cuda_missing[p] = missing

    def is_cuda(p):
        return p in cuda_missing

    todo = [p for p in order if not is_cuda(p)]
    together = {}
    for p in todo:
        try:
            ctypes.CDLL(p, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
        except OSError as e:
            together[p] = str(e)
    for p in list(together):  # once its dependents are in, a library may resolve (see below)
        try:
            ctypes.CDLL(p, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
            del together[p]
        except OSError as e:
            together[p] = str(e)

    env = dict(os.environ, SLIM_TREE_SONAMES=":".join(sorted(sonames)))

    def alone_run(p):
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--check-one", root, p],
                           capture_output=True, text=True, env=env)
        return p, r.returncode, (r.stdout.strip() or r.stderr.strip() or f"rc {r.returncode}")

    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=2) as ex:
        alone = {p: (rc, msg) for p, rc, msg in ex.map(alone_run, todo)}

    pytag = f"cpython-{sys.version_info.major}{sys.version_info.minor}-"
    print(f"--check {root}: {len(order)} libraries; all in one process in dependency order "
          f"(RTLD_NOW|RTLD_GLOBAL), then each alone in a fresh process (RTLD_NOW)")
    fails = 0
    for p in order:
        rel = os.path.relpath(p, root)
        base = os.path.basename(p)
        if is_cuda(p):
            print(f"SKIP {rel}: CUDA module; {', '.join(cuda_missing[p])} not loadable here")
            continue
        rc, msg = alone[p]
        if p in together:
            err = together[p]
            if ".cpython-" in base and pytag not in base and "undefined symbol: " in err \
                    and err.split("undefined symbol: ")[-1].startswith(("Py", "_Py")):
                print(f"SKIP {rel}: extension for another CPython ({err.split(': ')[-1]})")
                continue
            fails += 1
            print(f"FAIL {rel}: {err}" + (f" | alone: {msg}" if rc else ""))
        elif rc == 0:
            print(f"OK   {rel}")
        else:
            # Some bundled libraries leave symbols to the library that needs them (upb's
            # reflection to grpc, libucm to libucs): they load only with their dependents.
            ok_users = [os.path.basename(u) for u in sorted(users[p], key=lambda u: (u not in direct[p], u))
                        if u in alone and alone[u][0] == 0]
            if "undefined symbol" in msg and ok_users and "outside the tree" not in msg:
                print(f"OK   {rel} (only with its dependents, e.g. {ok_users[0]}; "
                      f"alone: undefined symbol {msg.split('undefined symbol: ')[-1]})")
            else:
                fails += 1
                print(f"FAIL {rel}: alone: {msg}")
    for ln in links:
        target = os.path.realpath(ln)
        ok = os.path.isfile(target) and target.startswith(os.path.realpath(root) + os.sep)
        fails += not ok
        print(f"{'OK  ' if ok else 'FAIL'} {os.path.relpath(ln, root)} -> {os.readlink(ln)}"
              f"{'' if ok else ' (dangling or outside the tree)'}")
    for f in mapped_foreign(root, sonames):
        fails += 1
        print(f"FAIL mapped from outside the tree: {f}")
    print(f"--check: {'OK' if fails == 0 else f'{fails} failure(s)'}")
    return 0 if fails == 0 else 1


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--check-one":
        return check_one(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", metavar="DIR", help="load every library of a slim tree")
    ap.add_argument("--ucx", metavar="UCX_PREFIX", help="replace UCX by this install's")
    ap.add_argument("wheel", nargs="?")
    ap.add_argument("dir", nargs="?")
    a = ap.parse_args()
    if a.check:
        if a.wheel or a.ucx:
            ap.error("--check takes only DIR")
        return check(a.check)
    if not (a.wheel and a.dir):
        ap.error("need WHEEL DIR (or --check DIR)")
    try:
        build(a.wheel, a.dir, a.ucx)
    except (RuntimeError, ValueError, OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"slim.py: {e}")
    return check(a.dir)


if __name__ == "__main__":
    sys.exit(main())
