// packed_layer.h: one MoE layer's routed experts in one buffer, in the final packed layout, which
// is also the on-disk "packed layer file" (so loading is an mmap).
//
// File / buffer layout (little-endian):
//   [0, 4096)            LayerHeader (below), rest zero
//   [data_offset, ...)   data_offset = 2 MiB; expert e at data_offset + e * expert_stride:
//       gate_up qweight  [2I, H] packed in `format`; 16-row blocks alternate gate block j, up block j
//       gate_up scales   (integer formats)
//     or, when up's format differs from gate's (split_gate_up: a GGUF file may give them two types),
//       gate qweight, scales [I, H] in `format` at gate_up_qweight / gate_up_scales, then
//       up qweight, scales   [I, H] in `up_format` at up_qweight / up_scales
//       down qweight     [H, I] packed in `down_format` (a GGUF file often gives down another type)
//       down scales      (integer formats)
//     each array starts on a 4 KiB boundary, expert_stride is a multiple of 4 KiB.
// Data starts 2 MiB aligned in the file and in memory, so transparent huge pages can back it;
// experts themselves are not padded to 2 MiB (that would waste ~1.6% of RAM at K2.5 sizes).
//
// Work units shared by the operator and by page placement (NUMA first touch):
//   gate_up unit u = h columns [32u, 32u + 32) = packed gate_up blocks [4u, 4u + 4)
//                    (gate blocks 2u, 2u+1 and up blocks 2u, 2u+1); I/32 units per expert.
//   down unit u    = down row block u (rows [16u, 16u + 16) of H); H/16 units per expert.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "core/kernels.h"
#include "core/mapping_guard.h"

namespace hybrid {

class ThreadPool;

constexpr char kLayerMagic[8] = {'H', 'Y', 'B', 'M', 'O', 'E', 'L', '1'};
constexpr uint32_t kLayerVersion = 2;  // 2: up_format, down_format; version 1 files (one format) still open
constexpr uint64_t kLayerDataOffset = 2ull << 20;
constexpr uint64_t kLayerHeaderBytes = 4096;
// Shape bounds (K2.5: 384 experts, hidden 7168, intermediate 2048): with them an expert is under
// 2^43 bytes and a layer under 2^63, so no size computed from a header can wrap around.
constexpr int64_t kLayerMaxExperts = 1 << 16;
constexpr int64_t kLayerMaxWidth = 1 << 20;

struct LayerHeader {
  char magic[8];
  uint32_t version;
  uint32_t format;            // WeightFormat of gate (and of up unless up_format differs)
  uint64_t num_experts;       // E
  uint64_t hidden;            // H
  uint64_t intermediate;      // I
  uint64_t data_offset;       // 2 MiB
  uint64_t expert_stride;     // bytes per expert, 4 KiB multiple
  uint64_t gate_up_qweight;   // offsets inside one expert
  uint64_t gate_up_scales;
  uint64_t down_qweight;
  uint64_t down_scales;
  uint64_t total_bytes;       // file size
  // Version 2 (a version 1 file: up_format = down_format = format, up_qweight = up_scales = 0).
  uint32_t down_format;       // WeightFormat of down
  uint32_t up_format;         // WeightFormat of up
  uint64_t up_qweight;        // offsets inside one expert when up_format != format, else 0
  uint64_t up_scales;
};

// The header a layer of these formats and shape must have. Throws std::invalid_argument naming
// the bad field. Gate and up may differ only among integer formats (both sides' activations are
// then quantised the same way).
LayerHeader layer_layout(WeightFormat gate_format, WeightFormat up_format, WeightFormat down_format,
                         int64_t num_experts, int64_t hidden, int64_t intermediate);

inline int64_t gate_up_units(int64_t intermediate) { return intermediate / 32; }
inline int64_t down_units(int64_t hidden) { return hidden / kRowBlock; }

class PackedLayer {
 public:
  // Anonymous memory (zero), MADV_HUGEPAGE, header written; fill it with the pack functions.
  static std::shared_ptr<PackedLayer> create(WeightFormat gate_format, WeightFormat up_format,
                                             WeightFormat down_format, int64_t num_experts, int64_t hidden,
                                             int64_t intermediate);
  // mmap a packed layer file read-only; validates the header and the file size. Throws
  // std::invalid_argument / std::runtime_error naming the file and the field.
  static std::shared_ptr<PackedLayer> open(const std::string& path);
  ~PackedLayer();
  PackedLayer(const PackedLayer&) = delete;
  PackedLayer& operator=(const PackedLayer&) = delete;

  // Write the file atomically: a new temp file beside `path` (O_EXCL, never through a link),
  // fsync, rename. Replaces only a regular file: std::invalid_argument when `path` is a link, a
  // device, a directory, a FIFO or a socket.
  void save(const std::string& path) const;

  // Throws std::runtime_error naming the file when it shrank while mapped (mapping_guard.h): the
  // reads past its new end saw zeros, so results computed since are wrong. Callers check after
  // each job (MoeOperator::sync, place, unpacking).
  void check_intact() const;

  // Read one byte per page of every expert, each thread the units it computes on, so pages of a
  // file mapping land (page cache, first touch) on the NUMA node that reads them.
  void place(ThreadPool& pool) const;

  const LayerHeader& header() const { return header_; }
  WeightFormat format() const { return WeightFormat(header_.format); }            // gate's
  WeightFormat up_format() const { return WeightFormat(header_.up_format); }
  WeightFormat down_format() const { return WeightFormat(header_.down_format); }
  bool split_gate_up() const { return header_.up_format != header_.format; }
  // Weight bytes of one gate_up unit (gate blocks 2u, 2u + 1 and up blocks 2u, 2u + 1), either layout.
  size_t gate_up_unit_bytes() const;
  int64_t num_experts() const { return int64_t(header_.num_experts); }
  int64_t hidden() const { return int64_t(header_.hidden); }
  int64_t intermediate() const { return int64_t(header_.intermediate); }
  uint64_t nbytes() const { return header_.total_bytes; }
  uint64_t expert_nbytes() const { return header_.expert_stride; }
  bool writable() const { return writable_; }
  const std::string& path() const { return path_; }

  PackedMatrix gate_up(int64_t e) const;  // [2I, H] interleaved; std::logic_error when split_gate_up()
  PackedMatrix gate(int64_t e) const;     // [I, H]  split_gate_up() only (std::logic_error otherwise)
  PackedMatrix up(int64_t e) const;       // [I, H]  split_gate_up() only
  PackedMatrix down(int64_t e) const;     // [H, I]
  uint8_t* expert_base(int64_t e) const { return data_ + header_.data_offset + e * header_.expert_stride; }
  const uint8_t* data() const { return data_; }

 private:
  PackedLayer() = default;
  uint8_t* data_ = nullptr;       // 2 MiB aligned start of the layout
  void* reservation_ = nullptr;   // what to munmap
  size_t reservation_bytes_ = 0;
  LayerHeader header_{};
  bool writable_ = false;
  std::string path_;
  std::unique_ptr<MappingGuard> guard_;  // file mappings only
};

}  // namespace hybrid
