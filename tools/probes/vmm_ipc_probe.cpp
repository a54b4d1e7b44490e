// vmm_ipc_probe: can this machine share CUDA VMM (cuMemCreate) memory between processes the way
// UCX's cuda_ipc transport does (issue 19: KV blocks between two processes through NIXL/UCX)?
//
// Build (standalone, not part of CMake; build it by hand into a build folder):
//   g++ -std=c++17 -O1 -o vmm_ipc_probe tools/probes/vmm_ipc_probe.cpp -I/usr/local/cuda/include -ldl
// (warning-free with -Wall -Wextra).
// Run: ./vmm_ipc_probe > probe.json   (no arguments)
//
// libcuda.so.1 is opened with dlopen, so the program builds and runs without a GPU: then it prints
// {"error": "no CUDA driver"} and exits 2. Otherwise it prints ONE JSON object:
//   kernel, yama_ptrace_scope (null if no Yama), cap_sys_ptrace, imex_channels (whether
//   /dev/nvidia-caps-imex-channels exists, and its entries; fabric handles need one);
//   driver_version; devices[]: name, VMM / POSIX-FD handle / fabric handle / GPUDirect RDMA /
//   GDR-with-VMM / DMA-BUF support, peer access to every other device;
//   vmm_allocations[] (device 0, one granularity page each): cuMemCreate with requestedHandleTypes
//   POSIX_FD, FABRIC, POSIX_FD|FABRIC, and POSIX_FD with gpuDirectRDMACapable=1; for each that
//   succeeds, after reserve+map+set access: the pointer attributes UCX reads
//   (IS_LEGACY_CUDA_IPC_CAPABLE, ALLOWED_HANDLE_TYPES, IS_GPU_DIRECT_RDMA_CAPABLE), the DMA-BUF fd
//   of the range, and UCX's own export (cuMemRetainAllocationHandle on the address, then
//   cuMemExportToShareableHandle as POSIX FD and as fabric handle);
//   legacy_allocation: the same attributes for a cuMemAlloc pointer;
//   pidfd_getfd: whether one process can take another's fd (UCX's POSIX-FD import) with
//   pidfd_open + pidfd_getfd, for parent->child and sibling->sibling (the UCX case: two peer
//   processes), each without and with the target calling prctl(PR_SET_PTRACER, ANY).
// Exit status: 0 when the JSON is complete, 1 when cuInit or a context call failed (the JSON says
// which), 2 without a CUDA driver.
#include <cuda.h>

#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <dirent.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <string>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434  // same number on every architecture (Linux 5.3)
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438  // Linux 5.6
#endif
#ifndef PR_SET_PTRACER
#define PR_SET_PTRACER 0x59616d61
#endif
#ifndef PR_SET_PTRACER_ANY
#define PR_SET_PTRACER_ANY ((unsigned long)-1)
#endif

namespace {

// ---- JSON text -------------------------------------------------------------------------------

std::string quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

// Members are appended as already-rendered JSON values.
struct object {
  std::vector<std::pair<std::string, std::string>> members;
  object& add(const std::string& key, const std::string& json) {
    members.emplace_back(key, json);
    return *this;
  }
  std::string str() const {
    std::string out = "{";
    for (std::size_t i = 0; i < members.size(); ++i)
      out += (i ? ", " : "") + quote(members[i].first) + ": " + members[i].second;
    return out + "}";
  }
};

std::string array(const std::vector<std::string>& items) {
  std::string out = "[";
  for (std::size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + items[i];
  return out + "]";
}

std::string boolean(bool b) { return b ? "true" : "false"; }

std::string errno_name(int e) {
  switch (e) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case ESRCH: return "ESRCH";
    case EINTR: return "EINTR";
    case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EFAULT: return "EFAULT";
    case EINVAL: return "EINVAL";
    case ENFILE: return "ENFILE";
    case EMFILE: return "EMFILE";
    case ENOSYS: return "ENOSYS";
    case ENODEV: return "ENODEV";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    default: return "errno " + std::to_string(e);
  }
}

// ---- the driver, through dlopen --------------------------------------------------------------

// The _v2 names are the ones cuda.h maps the plain names to (cuMemAlloc -> cuMemAlloc_v2 ...).
#define VMM_PROBE_DRIVER_FUNCS(X)                                                             \
  X(cuInit) X(cuDriverGetVersion) X(cuGetErrorName) X(cuDeviceGetCount) X(cuDeviceGet)        \
  X(cuDeviceGetName) X(cuDeviceGetAttribute) X(cuDeviceCanAccessPeer)                         \
  X(cuDevicePrimaryCtxRetain) X(cuDevicePrimaryCtxRelease_v2) X(cuCtxSetCurrent)              \
  X(cuMemGetAllocationGranularity) X(cuMemCreate) X(cuMemRelease) X(cuMemAddressReserve)      \
  X(cuMemAddressFree) X(cuMemMap) X(cuMemUnmap) X(cuMemSetAccess) X(cuPointerGetAttribute)    \
  X(cuMemGetHandleForAddressRange) X(cuMemRetainAllocationHandle)                             \
  X(cuMemExportToShareableHandle) X(cuMemAlloc_v2) X(cuMemFree_v2)

struct driver {
#define VMM_PROBE_MEMBER(name) decltype(&::name) name = nullptr;
  VMM_PROBE_DRIVER_FUNCS(VMM_PROBE_MEMBER)
#undef VMM_PROBE_MEMBER

  // Empty on success, else the first symbol libcuda lacks.
  std::string load(void* lib) {
#define VMM_PROBE_LOAD(name)                                              \
  name = reinterpret_cast<decltype(&::name)>(dlsym(lib, #name));          \
  if (!name) return #name;
    VMM_PROBE_DRIVER_FUNCS(VMM_PROBE_LOAD)
#undef VMM_PROBE_LOAD
    return {};
  }

  std::string err(CUresult r) const {
    const char* name = nullptr;
    if (cuGetErrorName(r, &name) != CUDA_SUCCESS || !name)
      return "CUresult " + std::to_string(static_cast<int>(r));
    return name;
  }
  std::string res(CUresult r) const { return quote(err(r)); }
};

// ---- host facts ------------------------------------------------------------------------------

std::string read_first_line(const char* path) {
  FILE* f = std::fopen(path, "r");
  if (!f) return {};
  char buf[256] = {};
  const bool ok = std::fgets(buf, sizeof buf, f) != nullptr;
  std::fclose(f);
  std::string s = ok ? buf : "";
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

bool has_cap_sys_ptrace() {
  FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return false;
  char line[256];
  unsigned long long caps = 0;
  while (std::fgets(line, sizeof line, f))
    if (std::sscanf(line, "CapEff: %llx", &caps) == 1) break;
  std::fclose(f);
  return (caps >> 19) & 1;  // CAP_SYS_PTRACE
}

void host_facts(object& out) {
  utsname u{};
  out.add("kernel", uname(&u) == 0 ? quote(u.release) : "null");
  const std::string yama = read_first_line("/proc/sys/kernel/yama/ptrace_scope");
  out.add("yama_ptrace_scope", yama.empty() ? "null" : yama);
  out.add("cap_sys_ptrace", boolean(has_cap_sys_ptrace()));
  object imex;
  const char* dir = "/dev/nvidia-caps-imex-channels";
  std::vector<std::string> entries;
  DIR* d = opendir(dir);
  imex.add("exists", boolean(d != nullptr));
  if (d) {
    while (dirent* e = readdir(d))
      if (std::strcmp(e->d_name, ".") && std::strcmp(e->d_name, "..")) entries.push_back(quote(e->d_name));
    closedir(d);
  }
  imex.add("entries", array(entries));
  out.add("imex_channels", imex.str());
}

// ---- pidfd_getfd -----------------------------------------------------------------------------

bool write_all(int fd, const void* p, std::size_t n) {
  return write(fd, p, n) == static_cast<ssize_t>(n);
}
bool read_all(int fd, void* p, std::size_t n) {
  return read(fd, p, n) == static_cast<ssize_t>(n);
}

// pidfd_open(target) then pidfd_getfd(target's fd); {open_errno, getfd_errno}, 0 = ok, -1 = not tried.
std::pair<int, int> take_fd(pid_t target, int target_fd) {
  const long pidfd = syscall(SYS_pidfd_open, target, 0);
  if (pidfd < 0) return {errno, -1};
  const long fd = syscall(SYS_pidfd_getfd, static_cast<int>(pidfd), target_fd, 0);
  const int e = fd < 0 ? errno : 0;
  if (fd >= 0) close(static_cast<int>(fd));
  close(static_cast<int>(pidfd));
  return {0, e};
}

// A target process: opens /dev/null, optionally lets anyone ptrace it, reports the fd number on
// `report`, then waits until `release` is closed (or 20 s pass). Returns its pid, -1 on failure.
pid_t spawn_target(bool ptracer_any, int& fd_number, int& release_w) {
  int report[2], release[2];
  if (pipe(report)) return -1;
  if (pipe(release)) { close(report[0]); close(report[1]); return -1; }
  const pid_t pid = fork();
  if (pid == 0) {
    close(report[0]);
    close(release[1]);
    alarm(20);
    if (ptracer_any) prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
    const int fd = open("/dev/null", O_RDONLY);
    write_all(report[1], &fd, sizeof fd);
    close(report[1]);
    char c;
    while (read(release[0], &c, 1) > 0) {}
    _exit(0);
  }
  close(report[1]);
  close(release[0]);
  if (pid < 0 || !read_all(report[0], &fd_number, sizeof fd_number)) {
    close(report[0]);
    close(release[1]);
    if (pid > 0) { kill(pid, SIGKILL); waitpid(pid, nullptr, 0); }
    return -1;
  }
  close(report[0]);
  release_w = release[1];
  return pid;
}

std::string pidfd_result(std::pair<int, int> r) {
  object o;
  o.add("pidfd_open", quote(r.first == 0 ? "ok" : errno_name(r.first)));
  o.add("pidfd_getfd", r.second == -1 ? "null" : quote(r.second == 0 ? "ok" : errno_name(r.second)));
  return o.str();
}

// parent_is_taker: the probe itself takes the child's fd (an ancestor, which Yama scope 1 allows);
// otherwise a second child does (a sibling, like two UCX peers).
std::string pidfd_case(bool parent_is_taker, bool ptracer_any) {
  int target_fd = -1, release_w = -1;
  const pid_t target = spawn_target(ptracer_any, target_fd, release_w);
  if (target < 0) return quote("fork/pipe failed: " + errno_name(errno));
  std::pair<int, int> r{-1, -1};
  std::string failure;
  if (parent_is_taker) {
    r = take_fd(target, target_fd);
  } else {
    int back[2];
    if (pipe(back)) {
      failure = "pipe failed";
    } else {
      const pid_t taker = fork();
      if (taker == 0) {
        close(back[0]);
        alarm(20);
        const auto res = take_fd(target, target_fd);
        const int both[2] = {res.first, res.second};
        write_all(back[1], both, sizeof both);
        _exit(0);
      }
      close(back[1]);
      int both[2];
      if (taker < 0 || !read_all(back[0], both, sizeof both))
        failure = "sibling failed";
      else
        r = {both[0], both[1]};
      close(back[0]);
      if (taker > 0) waitpid(taker, nullptr, 0);
    }
  }
  close(release_w);
  waitpid(target, nullptr, 0);
  return failure.empty() ? pidfd_result(r) : quote(failure);
}

std::string pidfd_facts() {
  object o;
  o.add("parent_to_child", pidfd_case(true, false));
  o.add("parent_to_child_ptracer_any", pidfd_case(true, true));
  o.add("sibling", pidfd_case(false, false));
  o.add("sibling_ptracer_any", pidfd_case(false, true));
  return o.str();
}

// ---- CUDA ------------------------------------------------------------------------------------

std::string dev_attr(const driver& cu, CUdevice dev, CUdevice_attribute a) {
  int v = 0;
  const CUresult r = cu.cuDeviceGetAttribute(&v, a, dev);
  return r == CUDA_SUCCESS ? std::to_string(v) : cu.res(r);
}

std::string handle_types(unsigned long long mask) {
  std::vector<std::string> names;
  if (mask & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) names.push_back(quote("POSIX_FD"));
  if (mask & CU_MEM_HANDLE_TYPE_WIN32) names.push_back(quote("WIN32"));
  if (mask & CU_MEM_HANDLE_TYPE_WIN32_KMT) names.push_back(quote("WIN32_KMT"));
  if (mask & CU_MEM_HANDLE_TYPE_FABRIC) names.push_back(quote("FABRIC"));
  return array(names);
}

// The pointer attributes UCX's cuda_ipc reads, and the DMA-BUF fd of [ptr, ptr + size).
void pointer_facts(const driver& cu, CUdeviceptr ptr, std::size_t size, object& out) {
  int legacy = 0;
  CUresult r = cu.cuPointerGetAttribute(&legacy, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE, ptr);
  out.add("is_legacy_cuda_ipc_capable", r == CUDA_SUCCESS ? boolean(legacy) : cu.res(r));
  std::uint64_t allowed = 0;
  r = cu.cuPointerGetAttribute(&allowed, CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES, ptr);
  if (r == CUDA_SUCCESS) {
    out.add("allowed_handle_types", std::to_string(allowed));
    out.add("allowed_handle_type_names", handle_types(allowed));
  } else {
    out.add("allowed_handle_types", cu.res(r));
  }
  int gdr = 0;
  r = cu.cuPointerGetAttribute(&gdr, CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_CAPABLE, ptr);
  out.add("is_gpu_direct_rdma_capable", r == CUDA_SUCCESS ? boolean(gdr) : cu.res(r));
  int dmabuf = -1;
  r = cu.cuMemGetHandleForAddressRange(&dmabuf, ptr, size, CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0);
  out.add("dma_buf_fd", cu.res(r));
  if (r == CUDA_SUCCESS && dmabuf >= 0) close(dmabuf);
}

// UCX's export: retain the allocation handle from the address, export it as `type`.
std::string ucx_export(const driver& cu, CUdeviceptr ptr, CUmemAllocationHandleType type) {
  CUmemGenericAllocationHandle h{};
  CUresult r = cu.cuMemRetainAllocationHandle(&h, reinterpret_cast<void*>(ptr));
  if (r != CUDA_SUCCESS) return quote("retain: " + cu.err(r));
  if (type == CU_MEM_HANDLE_TYPE_FABRIC) {
    CUmemFabricHandle fh{};
    r = cu.cuMemExportToShareableHandle(&fh, h, type, 0);
  } else {
    int fd = -1;
    r = cu.cuMemExportToShareableHandle(&fd, h, type, 0);
    if (r == CUDA_SUCCESS && fd >= 0) close(fd);
  }
  cu.cuMemRelease(h);
  return cu.res(r);
}

std::string vmm_case(const driver& cu, CUdevice dev, const char* label, unsigned types, bool gdr_flag) {
  object out;
  out.add("requested", quote(label));
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = static_cast<int>(dev);
  prop.requestedHandleTypes = static_cast<CUmemAllocationHandleType>(types);
  prop.allocFlags.gpuDirectRDMACapable = gdr_flag ? 1 : 0;
  std::size_t gran = 0;
  CUresult r = cu.cuMemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM);
  if (r != CUDA_SUCCESS) {
    out.add("granularity", cu.res(r));
    return out.str();
  }
  out.add("granularity", std::to_string(gran));
  CUmemGenericAllocationHandle h{};
  r = cu.cuMemCreate(&h, gran, &prop, 0);
  out.add("cuMemCreate", cu.res(r));
  if (r != CUDA_SUCCESS) return out.str();
  CUdeviceptr ptr = 0;
  bool reserved = false, mapped = false;
  if ((r = cu.cuMemAddressReserve(&ptr, gran, 0, 0, 0)) != CUDA_SUCCESS) {
    out.add("cuMemAddressReserve", cu.res(r));
  } else if (reserved = true, (r = cu.cuMemMap(ptr, gran, 0, h, 0)) != CUDA_SUCCESS) {
    out.add("cuMemMap", cu.res(r));
  } else {
    mapped = true;
    CUmemAccessDesc access{};
    access.location = prop.location;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    if ((r = cu.cuMemSetAccess(ptr, gran, &access, 1)) != CUDA_SUCCESS) {
      out.add("cuMemSetAccess", cu.res(r));
    } else {
      pointer_facts(cu, ptr, gran, out);
      out.add("ucx_export_posix_fd", ucx_export(cu, ptr, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR));
      out.add("ucx_export_fabric", ucx_export(cu, ptr, CU_MEM_HANDLE_TYPE_FABRIC));
    }
  }
  if (mapped) cu.cuMemUnmap(ptr, gran);
  if (reserved) cu.cuMemAddressFree(ptr, gran);
  cu.cuMemRelease(h);
  return out.str();
}

std::string legacy_case(const driver& cu, std::size_t size) {
  object out;
  CUdeviceptr ptr = 0;
  const CUresult r = cu.cuMemAlloc_v2(&ptr, size);
  out.add("cuMemAlloc", cu.res(r));
  if (r != CUDA_SUCCESS) return out.str();
  out.add("size", std::to_string(size));
  pointer_facts(cu, ptr, size, out);
  cu.cuMemFree_v2(ptr);
  return out.str();
}

}  // namespace

int main() {
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    std::puts("{\"error\": \"no CUDA driver\"}");
    return 2;
  }
  driver cu;
  if (const std::string missing = cu.load(lib); !missing.empty()) {
    std::printf("{\"error\": %s}\n", quote("libcuda.so.1 lacks " + missing).c_str());
    return 2;
  }

  object out;
  host_facts(out);
  // Before cuInit: the forked children then inherit no driver state.
  const std::string pidfd = pidfd_facts();

  int status = 0;
  CUresult r = cu.cuInit(0);
  const bool init_ok = r == CUDA_SUCCESS;
  out.add("cuInit", cu.res(r));
  int version = 0;
  if (init_ok && cu.cuDriverGetVersion(&version) == CUDA_SUCCESS)
    out.add("driver_version", std::to_string(version));
  int count = 0;
  if (init_ok) {
    r = cu.cuDeviceGetCount(&count);
    if (r != CUDA_SUCCESS) out.add("cuDeviceGetCount", cu.res(r));
  }
  std::vector<std::string> devices;
  for (int i = 0; i < count; ++i) {
    CUdevice dev = 0;
    object d;
    d.add("ordinal", std::to_string(i));
    if ((r = cu.cuDeviceGet(&dev, i)) != CUDA_SUCCESS) {
      d.add("cuDeviceGet", cu.res(r));
      devices.push_back(d.str());
      continue;
    }
    char name[256] = {};
    d.add("name", cu.cuDeviceGetName(name, sizeof name, dev) == CUDA_SUCCESS ? quote(name) : "null");
    d.add("VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED",
          dev_attr(cu, dev, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED));
    d.add("HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED",
          dev_attr(cu, dev, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED));
    d.add("HANDLE_TYPE_FABRIC_SUPPORTED", dev_attr(cu, dev, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED));
    d.add("GPU_DIRECT_RDMA_SUPPORTED", dev_attr(cu, dev, CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_SUPPORTED));
    d.add("GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED",
          dev_attr(cu, dev, CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED));
    d.add("DMA_BUF_SUPPORTED", dev_attr(cu, dev, CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED));
    object peers;
    for (int j = 0; j < count; ++j) {
      if (j == i) continue;
      CUdevice other = 0;
      int can = 0;
      r = cu.cuDeviceGet(&other, j);
      if (r == CUDA_SUCCESS) r = cu.cuDeviceCanAccessPeer(&can, dev, other);
      peers.add(std::to_string(j), r == CUDA_SUCCESS ? boolean(can) : cu.res(r));
    }
    d.add("peer_access", peers.str());
    devices.push_back(d.str());
  }
  out.add("devices", array(devices));
  if (!init_ok || count == 0) status = 1;

  if (count > 0) {
    CUdevice dev0 = 0;
    CUcontext ctx = nullptr;
    if ((r = cu.cuDeviceGet(&dev0, 0)) != CUDA_SUCCESS ||
        (r = cu.cuDevicePrimaryCtxRetain(&ctx, dev0)) != CUDA_SUCCESS) {
      out.add("context", cu.res(r));
      status = 1;
    } else if ((r = cu.cuCtxSetCurrent(ctx)) != CUDA_SUCCESS) {
      out.add("context", cu.res(r));
      cu.cuDevicePrimaryCtxRelease_v2(dev0);
      status = 1;
    } else {
      const unsigned fd = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, fabric = CU_MEM_HANDLE_TYPE_FABRIC;
      std::vector<std::string> allocs;
      allocs.push_back(vmm_case(cu, dev0, "POSIX_FD", fd, false));
      allocs.push_back(vmm_case(cu, dev0, "FABRIC", fabric, false));
      allocs.push_back(vmm_case(cu, dev0, "POSIX_FD|FABRIC", fd | fabric, false));
      allocs.push_back(vmm_case(cu, dev0, "POSIX_FD+gpuDirectRDMACapable", fd, true));
      out.add("vmm_allocations", array(allocs));
      out.add("legacy_allocation", legacy_case(cu, 2u << 20));
      cu.cuCtxSetCurrent(nullptr);
      cu.cuDevicePrimaryCtxRelease_v2(dev0);
    }
  }
  out.add("pidfd_getfd", pidfd);
  std::puts(out.str().c_str());
  dlclose(lib);
  return status;
}
