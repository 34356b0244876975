// CUDA building block shared by the scan and loss kernels: one thread block scans one segment
// (a padded row or a packed sequence) tile by tile. Each thread scans kItems consecutive
// tokens in registers, cub::BlockScan combines the thread totals, and the block carries the
// running (sum, count) from tile to tile. Accumulation is float64, like the CPU kernels.
//
// One block per segment keeps the scan exact and simple; a batch of many sequences fills the
// GPU, a single very long sequence runs on one SM (a decoupled look-back scan would spread it).
#pragma once

#include <cub/block/block_scan.cuh>

#include <cstdint>

namespace ctpo {

constexpr int kScanThreads = 256;
constexpr int kScanItems = 8;

struct SumCount {
  double sum;
  double count;
};

struct SumCountAdd {
  __device__ __forceinline__ SumCount operator()(const SumCount& a, const SumCount& b) const {
    return {a.sum + b.sum, a.count + b.count};
  }
};

// Token range of segment `seg`, clamped into [0, num_tokens) so malformed offsets cannot read
// or write out of bounds (offsets are validated on the host only for CPU tensors).
__device__ __forceinline__ void segment_range(const int32_t* cu, int64_t row_len, int64_t num_tokens, int64_t seg,
                                              int64_t* begin, int64_t* end) {
  int64_t b, e;
  if (cu != nullptr) {
    b = cu[seg];
    e = cu[seg + 1];
  } else {
    b = seg * row_len;
    e = b + row_len;
  }
  b = b < 0 ? 0 : (b > num_tokens ? num_tokens : b);
  e = e < b ? b : (e > num_tokens ? num_tokens : e);
  *begin = b;
  *end = e;
}

// Scans [begin, end) (from the end when `reverse`) starting at `carry`. contrib(i) gives token
// i's (sum, count) contribution; emit(i, inclusive) receives the inclusive prefix at token i.
// Must be called by every thread of the block.
template <typename Contrib, typename Emit>
__device__ void block_segment_scan(int64_t begin, int64_t end, bool reverse, SumCount carry, const Contrib& contrib,
                                   const Emit& emit) {
  using BlockScan = cub::BlockScan<SumCount, kScanThreads>;
  __shared__ typename BlockScan::TempStorage temp;
  const int64_t len = end - begin;
  constexpr int64_t kTile = static_cast<int64_t>(kScanThreads) * kScanItems;
  for (int64_t base = 0; base < len; base += kTile) {
    SumCount local[kScanItems];
    SumCount run = {0.0, 0.0};
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      const int64_t pos = base + static_cast<int64_t>(threadIdx.x) * kScanItems + k;
      if (pos < len) {
        const SumCount c = contrib(reverse ? end - 1 - pos : begin + pos);
        run.sum += c.sum;
        run.count += c.count;
      }
      local[k] = run;
    }
    SumCount prefix, aggregate;
    BlockScan(temp).ExclusiveScan(run, prefix, SumCount{0.0, 0.0}, SumCountAdd(), aggregate);
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      const int64_t pos = base + static_cast<int64_t>(threadIdx.x) * kScanItems + k;
      if (pos < len) {
        emit(reverse ? end - 1 - pos : begin + pos,
             SumCount{carry.sum + prefix.sum + local[k].sum, carry.count + prefix.count + local[k].count});
      }
    }
    carry.sum += aggregate.sum;
    carry.count += aggregate.count;
    __syncthreads();  // `temp` is reused by the next tile
  }
}

}  // namespace ctpo
