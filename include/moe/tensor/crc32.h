// CRC-32 (IEEE 802.3, zlib's crc32): the per-tensor checksum of moecore checkpoints and of the
// safetensors files moe-convert writes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moe {

// CRC-32 of `size` bytes, continuing from `crc` (0 to start).
uint32_t crc32(const void* data, size_t size, uint32_t crc = 0);

}  // namespace moe
