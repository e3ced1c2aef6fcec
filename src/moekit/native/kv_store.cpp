// Stores one decode step's new key and value rows into a host KV pool (moekit.pipeline.host_attention:
// NativeAttention.store_and_attend, through moekit_store_and_attend in attention.cpp), in place of
// torch's index_copy_ on the pipeline's attention worker.
//
// Why not torch: index_copy_ of a micro-batch's rows (128 x 2 KB for Mixtral) is over torch's
// parallel grain, so every call wakes torch's OpenMP team (its own libgomp, not this library's),
// whose threads then spin for a while on every core the attention kernel's team is about to run
// on. A row copy is a few microseconds of memcpy on the calling thread; no team at all.
#include <cstdint>
#include <cstring>

extern "C" {

// dst: a pool of rows of row_bytes each; src: n rows, contiguous; slots: n row indices into dst,
// checked by the caller (0 <= slot < the pool's rows).
void moekit_store_rows(void* dst, const void* src, const int64_t* slots, int64_t n, int64_t row_bytes) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  for (int64_t i = 0; i < n; ++i) std::memcpy(d + slots[i] * row_bytes, s + i * row_bytes, row_bytes);
}

}  // extern "C"
