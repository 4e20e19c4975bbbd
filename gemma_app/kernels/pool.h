// Work splitting shared by the CPU kernels (gemv.cc, attention.cc): the units of one call run
// on the calling thread and XLA's intra-op pool. The calling thread takes units too, so a call
// never waits on a pool that is busy elsewhere.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace gemma_app {

namespace ffi = xla::ffi;

// The units of one call, claimed one at a time by whichever thread is free.
struct UnitQueue {
  int64_t units = 0;
  int64_t max_workers = 1;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<int64_t> workers{0};
};

// Runs fn(unit, next, worker) for every unit in [0, units) on the calling thread and up to
// `threads` - 1 pool threads (0: as many as the pool has). Each thread claims its next unit
// before it runs the current one, so `next` (-1 for none) is the unit it will run next: fn may
// fetch its data ahead. `worker` in [0, threads) is the running thread's slot in this call,
// for per-thread scratch. Returns when every unit is done. `claim_next` false: a thread claims
// a unit only when it is free (next is always -1), for calls with about one unit per thread,
// which the calling thread would otherwise claim all of.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t units, const Fn& fn, int64_t threads = 0,
                 bool claim_next = true) {
  const int64_t most = std::max<int64_t>(1, pool.num_threads());
  threads = std::min<int64_t>(threads > 0 ? std::min(threads, most) : most, units);
  auto job = std::make_shared<UnitQueue>();
  job->units = units;
  job->max_workers = std::max<int64_t>(1, threads);
  // Tasks copy `work`; one that starts after the caller took every unit finds none and leaves
  // without touching fn's captures, which live on the caller's stack.
  auto work = [job, fn, claim_next]() {
    if (job->next.load(std::memory_order_relaxed) >= job->units) return;
    const int64_t worker = job->workers.fetch_add(1);
    if (worker >= job->max_workers) return;
    for (int64_t u = job->next.fetch_add(1); u < job->units;) {
      const int64_t next = claim_next ? job->next.fetch_add(1) : -1;
      fn(u, next < job->units ? next : -1, worker);
      job->done.fetch_add(1, std::memory_order_release);
      u = claim_next ? next : job->next.fetch_add(1);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([work]() { work(); });
  work();
  while (job->done.load(std::memory_order_acquire) < job->units) std::this_thread::yield();
}

}  // namespace gemma_app
