// Device side of accelguard's memory scrub (agent/scrub/cuda/kernels.py loads the PTX built from it).
//
// The host writes each pattern with cuMemsetD32; these kernels only READ global memory, so a
// verification cannot itself "fix" what it checks. Counters are 64-bit and reduced per warp
// before one atomic per warp, so an 80 GiB pass costs a few thousand atomics, not billions.
//
// Build: native/scrub/build.sh (the exact nvcc command; the PTX is committed).

#include <stdint.h>

// Layout of the verify counters (three unsigned 64-bit words, reset by the host per pass).
#define COUNTER_MISMATCHED_WORDS 0
#define COUNTER_EXAMINED_WORDS 1
#define COUNTER_FIRST_MISMATCH 2

// First-mismatch encoding: (chunk tag << 40) | word index in the chunk. atomicMin over it gives the
// lowest (chunk, index) pair; 2^40 words is 4 TiB per chunk, far above any single allocation.
#define WORD_INDEX_BITS 40
#define NO_MISMATCH 0xFFFFFFFFFFFFFFFFull

// Layout of the on-chip (shared memory) counters.
#define SHARED_MISMATCHED_WORDS 0
#define SHARED_BYTES_CLEARED 1
#define SHARED_BLOCKS_RUN 2

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long value) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        value += __shfl_down_sync(0xFFFFFFFFu, value, offset);
    }
    return value;
}

__device__ __forceinline__ unsigned long long warp_min(unsigned long long value) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        unsigned long long other = __shfl_down_sync(0xFFFFFFFFu, value, offset);
        value = other < value ? other : value;
    }
    return value;
}

// One bit per word of `v` that differs from `pattern` (bit 0 = v.x).
__device__ __forceinline__ unsigned int differing_words(uint4 v, unsigned int pattern) {
    return (unsigned int)(v.x != pattern) | ((unsigned int)(v.y != pattern) << 1) |
           ((unsigned int)(v.z != pattern) << 2) | ((unsigned int)(v.w != pattern) << 3);
}

__device__ __forceinline__ void note_vector(uint4 v, unsigned int pattern, unsigned long long word_index,
                                            unsigned long long* mismatched,
                                            unsigned long long* first) {
    unsigned int differing = differing_words(v, pattern);
    if (differing != 0u) {
        *mismatched += (unsigned long long)__popc(differing);
        // A thread visits its words in increasing order: its first hit is its lowest index.
        if (*first == NO_MISMATCH) {
            *first = word_index + (unsigned long long)(__ffs(differing) - 1);
        }
    }
}

__device__ __forceinline__ void note_word(unsigned int word, unsigned int pattern,
                                          unsigned long long word_index,
                                          unsigned long long* mismatched,
                                          unsigned long long* first) {
    if (word != pattern) {
        *mismatched += 1ull;
        if (word_index < *first) {
            *first = word_index;
        }
    }
}

// Count the 32-bit words of words[0, word_count) that differ from `pattern`.
//   counters[0] += words that differ, counters[1] += words examined,
//   counters[2] = min(counters[2], (chunk_tag << 40) | index of the first differing word).
// The block size must be a multiple of 32 (full warps for the shuffles); `words` must be 4-byte
// aligned (cuMemAlloc returns 256-byte aligned pointers). Loads are 16-byte vectors between the
// first and last 16-byte boundary; the 0-3 words before and after are read one by one.
extern "C" __global__ void __launch_bounds__(256) accelguard_scrub_verify(
    const unsigned int* __restrict__ words, unsigned long long word_count, unsigned int pattern,
    unsigned long long chunk_tag, unsigned long long* __restrict__ counters) {
    const unsigned long long thread =
        (unsigned long long)blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    const unsigned long long threads = (unsigned long long)gridDim.x * (unsigned long long)blockDim.x;

    unsigned long long mismatched = 0ull;
    unsigned long long examined = 0ull;
    unsigned long long first = NO_MISMATCH;

    const unsigned long long misalignment = (unsigned long long)(uintptr_t)words & 15ull;
    unsigned long long head = ((16ull - misalignment) & 15ull) / 4ull;
    if (head > word_count) {
        head = word_count;
    }
    const unsigned long long vector_count = (word_count - head) / 4ull;
    const unsigned long long tail_start = head + vector_count * 4ull;
    const unsigned long long tail = word_count - tail_start;

    if (thread < head) {
        note_word(__ldcs(words + thread), pattern, thread, &mismatched, &first);
        examined += 1ull;
    }

    // Streaming loads (ld.global.cs): every word is read exactly once, keep it out of the caches.
    const uint4* vectors = reinterpret_cast<const uint4*>(words + head);
    unsigned long long i = thread;
    // Four independent loads in flight per thread before any comparison: HBM needs the
    // memory-level parallelism to reach memset bandwidth.
    for (; i + 3ull * threads < vector_count; i += 4ull * threads) {
        const uint4 a = __ldcs(vectors + i);
        const uint4 b = __ldcs(vectors + i + threads);
        const uint4 c = __ldcs(vectors + i + 2ull * threads);
        const uint4 d = __ldcs(vectors + i + 3ull * threads);
        note_vector(a, pattern, head + i * 4ull, &mismatched, &first);
        note_vector(b, pattern, head + (i + threads) * 4ull, &mismatched, &first);
        note_vector(c, pattern, head + (i + 2ull * threads) * 4ull, &mismatched, &first);
        note_vector(d, pattern, head + (i + 3ull * threads) * 4ull, &mismatched, &first);
        examined += 16ull;
    }
    for (; i < vector_count; i += threads) {
        note_vector(__ldcs(vectors + i), pattern, head + i * 4ull, &mismatched, &first);
        examined += 4ull;
    }

    if (thread < tail) {
        note_word(__ldcs(words + tail_start + thread), pattern, tail_start + thread, &mismatched,
                  &first);
        examined += 1ull;
    }

    mismatched = warp_sum(mismatched);
    examined = warp_sum(examined);
    first = warp_min(first);
    if ((threadIdx.x & 31u) == 0u) {
        if (mismatched != 0ull) {
            atomicAdd(counters + COUNTER_MISMATCHED_WORDS, mismatched);
        }
        if (examined != 0ull) {
            atomicAdd(counters + COUNTER_EXAMINED_WORDS, examined);
        }
        if (first != NO_MISMATCH) {
            atomicMin(counters + COUNTER_FIRST_MISMATCH, (chunk_tag << WORD_INDEX_BITS) | first);
        }
    }
}

// LeftoverLocals (CVE-2023-4969): shared memory keeps the previous kernel's data unless someone
// overwrites it. Each block takes `shared_words` words of dynamic shared memory (the host asks for
// the per-block opt-in maximum, so one block fills an SM), writes all-ones, checks, writes zero,
// checks. counters[0] += words that did not read back, counters[1] += bytes cleared,
// counters[2] += blocks run; sm_visits[%smid] += 1 so the host can tell which SMs were reached
// (%smid values need not be contiguous: PTX ISA, "Special Registers: %smid").
extern "C" __global__ void __launch_bounds__(256) accelguard_clear_shared(
    unsigned int shared_words, unsigned long long* __restrict__ counters,
    unsigned int* __restrict__ sm_visits, unsigned int sm_slots) {
    extern __shared__ unsigned int on_chip[];
    // volatile: the first fill is overwritten without being read by the same thread; without it
    // the compiler may drop it, and the read-backs must come from the memory, not registers.
    volatile unsigned int* cells = on_chip;
    unsigned long long mismatched = 0ull;

    for (unsigned int i = threadIdx.x; i < shared_words; i += blockDim.x) {
        cells[i] = 0xFFFFFFFFu;
    }
    __syncthreads();
    // Each thread checks words another thread wrote (offset by one block's worth of threads).
    for (unsigned int i = threadIdx.x; i < shared_words; i += blockDim.x) {
        const unsigned int j = (i + blockDim.x) % shared_words;
        if (cells[j] != 0xFFFFFFFFu) {
            mismatched += 1ull;
        }
    }
    __syncthreads();
    for (unsigned int i = threadIdx.x; i < shared_words; i += blockDim.x) {
        cells[i] = 0u;
    }
    __syncthreads();
    for (unsigned int i = threadIdx.x; i < shared_words; i += blockDim.x) {
        const unsigned int j = (i + blockDim.x) % shared_words;
        if (cells[j] != 0u) {
            mismatched += 1ull;
        }
    }

    mismatched = warp_sum(mismatched);
    if ((threadIdx.x & 31u) == 0u && mismatched != 0ull) {
        atomicAdd(counters + SHARED_MISMATCHED_WORDS, mismatched);
    }
    if (threadIdx.x == 0u) {
        unsigned int smid;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
        atomicAdd(counters + SHARED_BYTES_CLEARED, (unsigned long long)shared_words * 4ull);
        atomicAdd(counters + SHARED_BLOCKS_RUN, 1ull);
        if (smid < sm_slots) {
            atomicAdd(sm_visits + smid, 1u);
        }
    }
}
