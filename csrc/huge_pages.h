// Buffers on 2 MiB boundaries, on transparent huge pages where the kernel allows them
// (madvise mode): a buffer a decode step streams then costs far fewer TLB misses.
#pragma once
#include <sys/mman.h>

#include <cstddef>
#include <cstdint>

namespace retnet {

constexpr size_t kHugePage = size_t{2} << 20;

// The bytes a mapping of `bytes` takes: whole 2 MiB pages.
inline size_t huge_mapping_size(size_t bytes) { return (bytes + kHugePage - 1) / kHugePage * kHugePage; }

// huge_mapping_size(bytes) zero bytes on a 2 MiB boundary, null when the kernel refuses the
// mapping; munmap(p, huge_mapping_size(bytes)) gives them back.
inline void* map_huge(size_t bytes) {
  const size_t rounded = huge_mapping_size(bytes);
  char* const raw = static_cast<char*>(
      mmap(nullptr, rounded + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (raw == MAP_FAILED) return nullptr;
  char* const p = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(raw) + kHugePage - 1) / kHugePage * kHugePage);
  if (p > raw) munmap(raw, p - raw);
  if (raw + kHugePage > p) munmap(p + rounded, raw + kHugePage - p);
#ifdef MADV_HUGEPAGE
  madvise(p, rounded, MADV_HUGEPAGE);
#endif
  return p;
}

}  // namespace retnet
