// packed_layer.cpp: see packed_layer.h.
#include "core/packed_layer.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <stdexcept>

#include "core/pack.h"
#include "core/thread_pool.h"

namespace hybrid {
namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kHuge = 2ull << 20;

uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

std::string sys_error(const std::string& what, const std::string& path) {
  return what + " '" + path + "': " + std::strerror(errno);
}

// Reserve `bytes` of address space whose start is 2 MiB aligned; returns the aligned start.
uint8_t* reserve_aligned(size_t bytes, void** reservation, size_t* reservation_bytes) {
  size_t total = bytes + kHuge;
  void* p = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED)
    throw std::runtime_error("cannot reserve " + std::to_string(bytes) + " bytes of address space: " +
                             std::strerror(errno));
  *reservation = p;
  *reservation_bytes = total;
  return reinterpret_cast<uint8_t*>(round_up(reinterpret_cast<uintptr_t>(p), kHuge));
}

}  // namespace

LayerHeader layer_layout(WeightFormat format, WeightFormat up_format, WeightFormat down_format, int64_t e,
                         int64_t h, int64_t i) {
  if (int(format) < 0 || int(format) >= kNumWeightFormats)
    throw std::invalid_argument("format: unknown weight format " + std::to_string(int(format)));
  if (int(up_format) < 0 || int(up_format) >= kNumWeightFormats)
    throw std::invalid_argument("up_format: unknown weight format " + std::to_string(int(up_format)));
  if (int(down_format) < 0 || int(down_format) >= kNumWeightFormats)
    throw std::invalid_argument("down_format: unknown weight format " + std::to_string(int(down_format)));
  const bool split = up_format != format;
  if (split && (format == WeightFormat::BF16 || up_format == WeightFormat::BF16))
    throw std::invalid_argument("up_format: gate and up may have different formats only when both are integer "
                                "formats (gate " + std::to_string(int(format)) + ", up " +
                                std::to_string(int(up_format)) + ")");
  // The bounds keep every size below 2^63 (a header could otherwise wrap total_bytes around to a
  // small number that a short file satisfies, and experts would be read far outside the map).
  if (e < 1 || e > kLayerMaxExperts)
    throw std::invalid_argument("num_experts must be in 1.." + std::to_string(kLayerMaxExperts) + ", got " +
                                std::to_string(e));
  // hidden is gate_up's K, intermediate down's: 256 for the K types (kernels.h k_multiple).
  const int64_t hm = std::max(k_multiple(format), k_multiple(up_format));
  if (h < kGroup || h % hm != 0 || h > kLayerMaxWidth)
    throw std::invalid_argument("hidden must be a positive multiple of " + std::to_string(hm) +
                                " for this gate_up format, up to " + std::to_string(kLayerMaxWidth) + ", got " +
                                std::to_string(h));
  if (i < kGroup || i % k_multiple(down_format) != 0 || i > kLayerMaxWidth)
    throw std::invalid_argument("intermediate must be a positive multiple of " +
                                std::to_string(k_multiple(down_format)) + " for this down format, up to " +
                                std::to_string(kLayerMaxWidth) + ", got " + std::to_string(i));
  LayerHeader hd{};
  std::memcpy(hd.magic, kLayerMagic, 8);
  hd.version = kLayerVersion;
  hd.format = uint32_t(format);
  hd.down_format = uint32_t(down_format);
  hd.up_format = uint32_t(up_format);
  hd.num_experts = uint64_t(e);
  hd.hidden = uint64_t(h);
  hd.intermediate = uint64_t(i);
  hd.data_offset = kLayerDataOffset;
  uint64_t off = 0;
  const int64_t gate_rows = split ? i : 2 * i;  // interleaved gate_up, or gate alone
  hd.gate_up_qweight = off;
  off = round_up(off + packed_qweight_bytes(format, gate_rows, h), kPage);
  hd.gate_up_scales = off;
  off = round_up(off + packed_scale_bytes(format, gate_rows, h), kPage);
  if (split) {
    hd.up_qweight = off;
    off = round_up(off + packed_qweight_bytes(up_format, i, h), kPage);
    hd.up_scales = off;
    off = round_up(off + packed_scale_bytes(up_format, i, h), kPage);
  }
  hd.down_qweight = off;
  off = round_up(off + packed_qweight_bytes(down_format, h, i), kPage);
  hd.down_scales = off;
  off = round_up(off + packed_scale_bytes(down_format, h, i), kPage);
  hd.expert_stride = off;
  hd.total_bytes = hd.data_offset + uint64_t(e) * off;
  return hd;
}

std::shared_ptr<PackedLayer> PackedLayer::create(WeightFormat format, WeightFormat up_format,
                                                 WeightFormat down_format, int64_t e, int64_t h, int64_t i) {
  LayerHeader hd = layer_layout(format, up_format, down_format, e, h, i);
  std::shared_ptr<PackedLayer> L(new PackedLayer());
  uint8_t* base = reserve_aligned(hd.total_bytes, &L->reservation_, &L->reservation_bytes_);
  void* p = mmap(base, hd.total_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                 -1, 0);
  if (p == MAP_FAILED)
    throw std::runtime_error("cannot allocate " + std::to_string(hd.total_bytes) +
                             " bytes for a packed layer: " + std::strerror(errno));
  madvise(base, hd.total_bytes, MADV_HUGEPAGE);  // best effort (THP "madvise" mode honours it)
  L->data_ = base;
  L->header_ = hd;
  L->writable_ = true;
  std::memcpy(base, &hd, sizeof(hd));
  return L;
}

std::shared_ptr<PackedLayer> PackedLayer::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error(sys_error("cannot open packed layer file", path));
  struct FdCloser { int fd; ~FdCloser() { ::close(fd); } } closer{fd};
  struct stat st {};
  if (fstat(fd, &st) != 0) throw std::runtime_error(sys_error("cannot stat", path));
  LayerHeader hd{};
  if (uint64_t(st.st_size) < sizeof(hd) || pread(fd, &hd, sizeof(hd), 0) != ssize_t(sizeof(hd)))
    throw std::invalid_argument("'" + path + "' is not a packed layer file: shorter than its header");
  if (std::memcmp(hd.magic, kLayerMagic, 8) != 0)
    throw std::invalid_argument("'" + path + "' is not a packed layer file (bad magic)");
  if (hd.version != kLayerVersion && hd.version != 1)
    throw std::invalid_argument("'" + path + "': packed layer version " + std::to_string(hd.version) +
                                ", this build reads versions 1 and " + std::to_string(kLayerVersion));
  if (hd.version == 1) {  // one format for the whole layer; the bytes past total_bytes were zero
    hd.down_format = hd.up_format = hd.format;
    hd.up_qweight = hd.up_scales = 0;
  }
  LayerHeader want;
  try {
    want = layer_layout(WeightFormat(hd.format), WeightFormat(hd.up_format), WeightFormat(hd.down_format),
                        int64_t(hd.num_experts), int64_t(hd.hidden), int64_t(hd.intermediate));
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument("'" + path + "': header field " + e.what());
  }
  const char* fields[] = {"data_offset", "expert_stride", "gate_up_qweight", "gate_up_scales",
                          "down_qweight", "down_scales", "total_bytes", "up_qweight", "up_scales"};
  const uint64_t have_v[] = {hd.data_offset, hd.expert_stride, hd.gate_up_qweight, hd.gate_up_scales,
                             hd.down_qweight, hd.down_scales, hd.total_bytes, hd.up_qweight, hd.up_scales};
  const uint64_t want_v[] = {want.data_offset, want.expert_stride, want.gate_up_qweight,
                             want.gate_up_scales, want.down_qweight, want.down_scales, want.total_bytes,
                             want.up_qweight, want.up_scales};
  for (int f = 0; f < 9; ++f)
    if (have_v[f] != want_v[f])
      throw std::invalid_argument("'" + path + "': header field " + fields[f] + " = " +
                                  std::to_string(have_v[f]) + ", expected " + std::to_string(want_v[f]) +
                                  " for this format and shape");
  if (uint64_t(st.st_size) < hd.total_bytes)
    throw std::invalid_argument("'" + path + "' is truncated: " + std::to_string(st.st_size) +
                                " bytes, header says " + std::to_string(hd.total_bytes));

  std::shared_ptr<PackedLayer> L(new PackedLayer());
  uint8_t* base = reserve_aligned(hd.total_bytes, &L->reservation_, &L->reservation_bytes_);
  void* p = mmap(base, hd.total_bytes, PROT_READ, MAP_SHARED | MAP_FIXED, fd, 0);
  if (p == MAP_FAILED) throw std::runtime_error(sys_error("cannot mmap", path));
  madvise(base, hd.total_bytes, MADV_HUGEPAGE);  // file THP needs kernel support; ignored otherwise
  L->data_ = base;
  L->header_ = hd;
  L->writable_ = false;
  L->path_ = path;
  L->guard_ = std::make_unique<MappingGuard>(base, hd.total_bytes);
  return L;
}

PackedLayer::~PackedLayer() {
  guard_.reset();  // before the range goes: nothing may repair pages of a later mapping there
  if (reservation_ != nullptr) munmap(reservation_, reservation_bytes_);
}

void PackedLayer::check_intact() const {
  if (guard_ && guard_->faulted())
    throw std::runtime_error("packed layer file '" + path_ + "' shrank while mapped (truncated or rewritten in "
                             "place): reads past its new end saw zeros, so this layer's results are wrong; "
                             "restore the file and load it again");
}

namespace {

const char* file_kind(mode_t m) {
  if (S_ISLNK(m)) return "a symbolic link";
  if (S_ISDIR(m)) return "a directory";
  if (S_ISCHR(m) || S_ISBLK(m)) return "a device";
  if (S_ISFIFO(m)) return "a FIFO";
  if (S_ISSOCK(m)) return "a socket";
  return "not a regular file";
}

// Throws unless `name` in directory `dirfd` is absent or a regular file (never followed).
void check_replaceable(int dirfd, const std::string& name, const std::string& path) {
  struct stat st {};
  if (fstatat(dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && !S_ISREG(st.st_mode))
    throw std::invalid_argument("'" + path + "' is " + file_kind(st.st_mode) +
                                ": a packed layer is saved only as (or over) a regular file");
}

}  // namespace

void PackedLayer::save(const std::string& path) const {
  // Everything happens relative to the directory opened once (no path is looked up twice), the
  // temp file is created new (O_EXCL | O_NOFOLLOW: a planted link is never written through), and
  // only a regular file or nothing is replaced.
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  if (name.empty() || name == "." || name == "..")
    throw std::invalid_argument("'" + path + "' does not name a file to save a packed layer to");
  int dirfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dirfd < 0) throw std::runtime_error(sys_error("cannot open the directory of", path));
  struct FdCloser { int fd; ~FdCloser() { ::close(fd); } } dir_closer{dirfd};
  check_replaceable(dirfd, name, path);
  static std::atomic<uint64_t> serial{0};
  const std::string tmp_name = name + ".tmp-" + std::to_string(getpid()) + "-" + std::to_string(serial++);
  const std::string tmp = dir + "/" + tmp_name;
  int fd = ::openat(dirfd, tmp_name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (fd < 0) throw std::runtime_error(sys_error("cannot create", tmp));
  auto fail = [&](const std::string& what) {
    std::string msg = sys_error(what, tmp);
    ::close(fd);
    ::unlinkat(dirfd, tmp_name.c_str(), 0);
    throw std::runtime_error(msg);
  };
  auto write_all = [&](const uint8_t* p, uint64_t n, uint64_t off) {
    while (n > 0) {
      ssize_t w = pwrite(fd, p, size_t(std::min<uint64_t>(n, 1ull << 30)), off_t(off));
      if (w < 0) {
        if (errno == EINTR) continue;
        fail("cannot write");
      }
      p += w;
      n -= uint64_t(w);
      off += uint64_t(w);
    }
  };
  write_all(data_, kLayerHeaderBytes, 0);
  write_all(data_ + header_.data_offset, header_.total_bytes - header_.data_offset, header_.data_offset);
  if (ftruncate(fd, off_t(header_.total_bytes)) != 0) fail("cannot size");
  if (fsync(fd) != 0) fail("cannot fsync");
  if (::close(fd) != 0) {
    ::unlinkat(dirfd, tmp_name.c_str(), 0);
    throw std::runtime_error(sys_error("cannot close", tmp));
  }
  try {
    check_replaceable(dirfd, name, path);  // again: something may have appeared meanwhile
  } catch (...) {
    ::unlinkat(dirfd, tmp_name.c_str(), 0);
    throw;
  }
  if (::renameat(dirfd, tmp_name.c_str(), dirfd, name.c_str()) != 0) {
    std::string msg = sys_error("cannot rename to '" + path + "' from", tmp);
    ::unlinkat(dirfd, tmp_name.c_str(), 0);
    throw std::runtime_error(msg);
  }
  fsync(dirfd);  // best effort: the rename itself durable
}

namespace {
PackedMatrix matrix_at(WeightFormat f, int64_t n, int64_t k, const uint8_t* base, uint64_t q, uint64_t sc) {
  return {f, n, k, base + q,
          packed_scale_bytes(f, n, k) == 0 ? nullptr : reinterpret_cast<const uint16_t*>(base + sc)};
}
}  // namespace

PackedMatrix PackedLayer::gate_up(int64_t e) const {
  if (split_gate_up()) throw std::logic_error("gate_up(): this layer's gate and up have different formats (gate(), up())");
  return matrix_at(format(), 2 * intermediate(), hidden(), expert_base(e), header_.gate_up_qweight, header_.gate_up_scales);
}

PackedMatrix PackedLayer::gate(int64_t e) const {
  if (!split_gate_up()) throw std::logic_error("gate(): this layer's gate and up are interleaved (gate_up())");
  return matrix_at(format(), intermediate(), hidden(), expert_base(e), header_.gate_up_qweight, header_.gate_up_scales);
}

PackedMatrix PackedLayer::up(int64_t e) const {
  if (!split_gate_up()) throw std::logic_error("up(): this layer's gate and up are interleaved (gate_up())");
  return matrix_at(up_format(), intermediate(), hidden(), expert_base(e), header_.up_qweight, header_.up_scales);
}

size_t PackedLayer::gate_up_unit_bytes() const {
  return 2 * (block_qweight_bytes(format(), hidden()) + block_qweight_bytes(up_format(), hidden()));
}

PackedMatrix PackedLayer::down(int64_t e) const {
  return matrix_at(down_format(), hidden(), intermediate(), expert_base(e), header_.down_qweight, header_.down_scales);
}

void PackedLayer::place(ThreadPool& pool) const {
  const int64_t E = num_experts(), gu_units = gate_up_units(intermediate()), dn_units = down_units(hidden());
  auto touch = [](const uint8_t* p, size_t n) {
    uint8_t acc = 0;
    for (size_t o = 0; o < n; o += kPage) acc ^= *reinterpret_cast<const volatile uint8_t*>(p + o);
    if (n > 0) acc ^= *reinterpret_cast<const volatile uint8_t*>(p + n - 1);
    return acc;
  };
  auto touch_blocks = [&](const PackedMatrix& m, int64_t b0, int64_t b1) {  // row blocks [b0, b1) of m
    const size_t q = block_qweight_bytes(m.format, m.k), sc = block_scale_count(m.format, m.k);
    touch(m.qweight + b0 * q, size_t(b1 - b0) * q);
    if (m.scales) touch(reinterpret_cast<const uint8_t*>(m.scales + b0 * sc), size_t(b1 - b0) * sc * 2);
  };
  pool.run({[&, this](int tid, int team) {
    auto [g0, g1] = pool.split(gu_units, tid, team);
    auto [d0, d1] = pool.split(dn_units, tid, team);
    for (int64_t e = 0; e < E; ++e) {
      if (split_gate_up()) {
        touch_blocks(gate(e), 2 * g0, 2 * g1);
        touch_blocks(up(e), 2 * g0, 2 * g1);
      } else {
        touch_blocks(gate_up(e), 4 * g0, 4 * g1);
      }
      touch_blocks(down(e), d0, d1);
    }
  }});
  check_intact();
}

}  // namespace hybrid
