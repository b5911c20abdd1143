// Runtime of the CUDA emulation (emulation.h): one OS thread per thread of a block, a monitor
// per launch for barriers and warp operations, and the checks that turn a divergent barrier
// into an error instead of a hang.
//
// Under ThreadSanitizer (the race-check build) TSan ignores this file's own locking and the
// accesses made under it, which would otherwise order every access of every thread; the
// runtime tells TSan the orderings CUDA guarantees instead: __syncthreads orders the whole block, __syncwarp its warp, the end of a
// block the next block; shuffles, votes and atomics order nothing.
#include "emulation.h"

#include <c10/util/Exception.h>

#include <condition_variable>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

extern "C" {
// ThreadSanitizer's annotations; null unless the TSan runtime is loaded.
void AnnotateHappensBefore(const char* file, int line, const volatile void* address) __attribute__((weak));
void AnnotateHappensAfter(const char* file, int line, const volatile void* address) __attribute__((weak));
void AnnotateIgnoreSyncBegin(const char* file, int line) __attribute__((weak));
void AnnotateIgnoreSyncEnd(const char* file, int line) __attribute__((weak));
void AnnotateIgnoreReadsBegin(const char* file, int line) __attribute__((weak));
void AnnotateIgnoreReadsEnd(const char* file, int line) __attribute__((weak));
void AnnotateIgnoreWritesBegin(const char* file, int line) __attribute__((weak));
void AnnotateIgnoreWritesEnd(const char* file, int line) __attribute__((weak));
}

namespace reclora_emu {
namespace {

constexpr int kWarpSize = 32;
// Uninitialized shared memory reads as this byte, so that a kernel relying on zeros fails.
constexpr unsigned char kSharedFill = 0xcd;

void release(const void* token) {
  if (AnnotateHappensBefore) AnnotateHappensBefore(__FILE__, __LINE__, token);
}
void acquire(const void* token) {
  if (AnnotateHappensAfter) AnnotateHappensAfter(__FILE__, __LINE__, token);
}

// Holds the launch's lock, hiding it and the accesses under it from TSan.
class Locked {
 public:
  explicit Locked(std::mutex& mutex) : lock_(mutex, std::defer_lock) {
    if (AnnotateIgnoreSyncBegin) {
      AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
      AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
      AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
    }
    lock_.lock();
  }
  ~Locked() {
    lock_.unlock();
    if (AnnotateIgnoreSyncEnd) {
      AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
      AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
      AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
    }
  }
  std::unique_lock<std::mutex>& get() { return lock_; }

 private:
  std::unique_lock<std::mutex> lock_;
};

// Unwinds a thread of a failed launch; the launch reports the first failure.
struct LaunchFailed {};

enum class Waiting { no, barrier, warp, block_end };

struct Warp {
  const char* site = nullptr;  // the operation the arrived lanes wait in
  unsigned mask = 0;
  int arrived = 0;
  uint64_t generation = 0;
  uint64_t values[2][kWarpSize] = {};  // by generation parity: a lane reads while the next op writes
  char tokens[2] = {};                 // __syncwarp orderings, by the lanes' count of them
  std::condition_variable changed;     // the warp's lanes wait here, the block's threads elsewhere
};

class Grid {
 public:
  Grid(const char* kernel, const char* site, dim3 grid, dim3 block, size_t shared_bytes)
      : kernel_(kernel), site_(site), grid_(grid), block_(block), shared_bytes_(shared_bytes),
        threads_(int(block.x * block.y * block.z)), waiting_(threads_, Waiting::no), where_(threads_, nullptr),
        warps_((threads_ + kWarpSize - 1) / kWarpSize) {
    new_shared();
  }

  int threads() const { return threads_; }
  unsigned char* shared() const { return shared_.get(); }

  void syncthreads(int tid, const char* site, uint64_t passed) {
    release(&barrier_tokens_[passed % 2]);
    {
      Locked lock(mutex_);
      check_failed();
      if (barrier_arrived_ > 0 && barrier_site_ != site) {
        fail_locked(describe("divergent barrier: thread " + std::to_string(tid) + " reached __syncthreads at " + site +
                             " while other threads wait at " + barrier_site_));
      }
      barrier_site_ = site;
      const uint64_t generation = barrier_generation_;
      arrive(tid, Waiting::barrier, site);
      if (++barrier_arrived_ == threads_) {
        barrier_arrived_ = 0;
        barrier_site_ = nullptr;
        ++barrier_generation_;
        wake_all(Waiting::barrier);
      } else {
        wait(lock, changed_, [&] { return barrier_generation_ != generation; });
      }
    }
    acquire(&barrier_tokens_[passed % 2]);
  }

  // syncwarps: the __syncwarp calls this thread passed before, or -1 for shuffles and votes (no ordering).
  void warp_exchange(int tid, unsigned mask, uint64_t value, const char* site, uint64_t* out, int64_t syncwarps) {
    Warp& warp = warps_[tid / kWarpSize];
    const int lane = tid % kWarpSize;
    const unsigned present = lanes_present(tid / kWarpSize);
    const bool orders = syncwarps >= 0;
    if (orders) release(&warp.tokens[syncwarps % 2]);
    {
      Locked lock(mutex_);
      check_failed();
      if (!(mask >> lane & 1u)) {
        fail_locked(describe("lane " + std::to_string(lane) + " of warp " + std::to_string(tid / kWarpSize) +
                             " calls a warp operation at " + site + " with a mask that leaves it out"));
      }
      if (warp.arrived > 0 && (warp.site != site || warp.mask != mask)) {
        fail_locked(describe("divergent warp operation: lane " + std::to_string(lane) + " reached " + site +
                             " while other lanes of its warp wait at " + warp.site));
      }
      warp.site = site;
      warp.mask = mask;
      const uint64_t generation = warp.generation;
      const int parity = int(generation % 2);
      warp.values[parity][lane] = value;
      arrive(tid, Waiting::warp, site);
      if (++warp.arrived == __builtin_popcount(mask & present)) {
        warp.arrived = 0;
        warp.site = nullptr;
        ++warp.generation;
        wake_warp(tid / kWarpSize, mask);
      } else {
        wait(lock, warp.changed, [&] { return warp.generation != generation; });
      }
      std::copy(warp.values[parity], warp.values[parity] + kWarpSize, out);
    }
    if (orders) acquire(&warp.tokens[syncwarps % 2]);
  }

  // Thread tid finished the current block; false when the launch failed.
  bool end_block(int tid, uint64_t block) {
    release(&block_tokens_[block % 2]);
    {
      Locked lock(mutex_);
      if (failed_) return false;
      arrive(tid, Waiting::block_end, "the end of the kernel");
      if (++finished_ == threads_) {
        finished_ = 0;
        ++blocks_done_;
        new_shared();
        wake_all(Waiting::block_end);
      } else {
        const uint64_t done = blocks_done_;
        try {
          wait(lock, changed_, [&] { return blocks_done_ != done; });
        } catch (const LaunchFailed&) {
          return false;
        }
      }
    }
    acquire(&block_tokens_[block % 2]);
    return true;
  }

  void fail(const std::string& message) {
    Locked lock(mutex_);
    fail_locked(message, false);
  }

  [[noreturn]] void raise() const {
    TORCH_CHECK(false, "CUDA emulation: kernel ", kernel_, " (launched at ", site_, ") failed: ", error_);
  }
  bool failed() const { return failed_; }

  std::string block_name(uint64_t linear) const {
    std::ostringstream name;
    name << "block (" << linear % grid_.x << ", " << linear / grid_.x % grid_.y << ", "
         << linear / grid_.x / grid_.y << ")";
    return name.str();
  }

 private:
  unsigned lanes_present(int warp) const {
    const int lanes = std::min(kWarpSize, threads_ - warp * kWarpSize);
    return lanes == kWarpSize ? 0xffffffffu : (1u << lanes) - 1u;
  }

  void new_shared() {
    // An exact-size heap block per thread block: overruns land in AddressSanitizer's redzones.
    shared_.reset(new unsigned char[shared_bytes_]);
    std::memset(shared_.get(), kSharedFill, shared_bytes_);
  }

  void arrive(int tid, Waiting kind, const char* site) {
    waiting_[tid] = kind;
    where_[tid] = site;
    --running_;
  }

  void wake_all(Waiting kind) {
    for (int t = 0; t < threads_; ++t) {
      if (waiting_[t] == kind) {
        waiting_[t] = Waiting::no;
        ++running_;
      }
    }
    changed_.notify_all();
  }

  void wake_warp(int warp, unsigned mask) {
    for (int lane = 0; lane < kWarpSize; ++lane) {
      const int t = warp * kWarpSize + lane;
      if ((mask >> lane & 1u) && t < threads_ && waiting_[t] == Waiting::warp) {
        waiting_[t] = Waiting::no;
        ++running_;
      }
    }
    warps_[warp].changed.notify_all();
  }

  // Waits for done(); every thread waiting with none running is a deadlock: reported, not hung.
  template <typename Done>
  void wait(Locked& lock, std::condition_variable& changed, Done done) {
    if (running_ == 0) {
      fail_locked(describe("divergent barrier: no thread of the block can go on"));
    }
    changed.wait(lock.get(), [&] { return failed_ || done(); });
    check_failed();
  }

  void check_failed() const {
    if (failed_) throw LaunchFailed{};
  }

  void fail_locked(const std::string& message, bool unwind = true) {
    if (!failed_) {
      failed_ = true;
      error_ = message;
    }
    changed_.notify_all();
    for (Warp& warp : warps_) warp.changed.notify_all();
    if (unwind) throw LaunchFailed{};
  }

  // The problem and where every thread of the block is, grouped by place.
  std::string describe(const std::string& problem) const {
    std::map<std::string, int> places;
    for (int t = 0; t < threads_; ++t) {
      switch (waiting_[t]) {
        case Waiting::no: ++places["running"]; break;
        case Waiting::barrier: ++places[std::string("at __syncthreads, ") + where_[t]]; break;
        case Waiting::warp: ++places[std::string("at a warp operation, ") + where_[t]]; break;
        case Waiting::block_end: ++places["finished the kernel"]; break;
      }
    }
    std::ostringstream text;
    text << problem << " (in " << block_name(blocks_done_) << " of " << threads_ << " threads:";
    const char* separator = " ";
    for (const auto& [place, count] : places) {
      text << separator << count << " " << place;
      separator = "; ";
    }
    text << ")";
    return text.str();
  }

  const char* kernel_;
  const char* site_;
  dim3 grid_, block_;
  size_t shared_bytes_;
  int threads_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<Waiting> waiting_;
  std::vector<const char*> where_;
  int running_ = threads_;
  const char* barrier_site_ = nullptr;
  int barrier_arrived_ = 0;
  uint64_t barrier_generation_ = 0;
  std::vector<Warp> warps_;
  int finished_ = 0;
  uint64_t blocks_done_ = 0;
  std::unique_ptr<unsigned char[]> shared_;
  bool failed_ = false;
  std::string error_;
  char barrier_tokens_[2] = {};
  char block_tokens_[2] = {};
};

// The calling thread's launch and place in it.
thread_local Grid* current = nullptr;
thread_local int thread_id = 0;
thread_local uint64_t barriers_passed = 0;
thread_local int64_t syncwarps_passed = 0;
// One launch at a time: blocks share static __shared__ variables.
std::mutex launches;

void run_thread(Grid& launch, int tid, dim3 grid, dim3 block, uint64_t blocks, const std::function<void()>& body) {
  current = &launch;
  thread_id = tid;
  barriers_passed = 0;
  syncwarps_passed = 0;
  blockDim = block;
  gridDim = grid;
  threadIdx = dim3(tid % block.x, tid / block.x % block.y, tid / (block.x * block.y));
  for (uint64_t b = 0; b < blocks; ++b) {
    blockIdx = dim3(unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / (uint64_t(grid.x) * grid.y)));
    try {
      body();
    } catch (const LaunchFailed&) {
      break;
    } catch (const std::exception& error) {
      launch.fail(launch.block_name(b) + ", thread " + std::to_string(tid) + ": " + error.what());
      break;
    }
    if (!launch.end_block(tid, b)) break;
  }
  current = nullptr;
}

}  // namespace

void run_grid(const char* kernel, const char* site, dim3 grid, dim3 block, size_t shared_bytes,
              const std::function<void()>& body) {
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(blocks >= 1 && threads >= 1 && threads <= 1024, "CUDA emulation: kernel ", kernel, " launched at ",
              site, " with an invalid configuration: ", blocks, " blocks of ", threads, " threads");
  TORCH_CHECK(current == nullptr, "CUDA emulation: kernel ", kernel, " launched from inside a kernel");
  std::lock_guard<std::mutex> one_at_a_time(launches);
  Grid launch(kernel, site, grid, block, shared_bytes);
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (int t = 0; t < launch.threads(); ++t) {
    workers.emplace_back(run_thread, std::ref(launch), t, grid, block, blocks, std::cref(body));
  }
  for (auto& worker : workers) worker.join();
  if (launch.failed()) launch.raise();
}

unsigned char* dynamic_shared() {
  return current->shared();
}

void syncthreads(const char* site) {
  current->syncthreads(thread_id, site, barriers_passed++);
}

void syncwarp(const char* site, unsigned mask) {
  uint64_t ignored[kWarpSize];
  current->warp_exchange(thread_id, mask, 0, site, ignored, syncwarps_passed++);
}

void warp_exchange(unsigned mask, uint64_t value, const char* site, uint64_t* out) {
  current->warp_exchange(thread_id, mask, value, site, out, -1);
}

void kernel_assert_failed(const char* condition, const char* site) {
  throw std::runtime_error(std::string("device-side assertion `") + condition + "` failed at " + site);
}

int lane_id() {
  return thread_id % kWarpSize;
}

}  // namespace reclora_emu

namespace at::cuda {
cudaDeviceProp* getCurrentDeviceProperties() {
  static cudaDeviceProp properties{[] {
    const char* sms = std::getenv("RECLORA_EMULATED_SMS");
    return sms != nullptr ? std::atoi(sms) : 132;
  }()};
  return &properties;
}
}  // namespace at::cuda
