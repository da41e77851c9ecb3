#pragma once
// A 4-ary max-heap of packed (distance, index) keys (pack_key.h), for the CPU coreset's
// lazy arg-max.
//
// Why not std::priority_queue / std::push_heap: the coreset's common move is "look at the
// top, refresh that point, put it back lower". A binary heap does that as a pop (one
// sift-down of the last element) plus a push (one sift-up); replace_top here is a single
// sift-down. Four children per node halve the depth (log4 n levels: 9 for a shard of
// 160,000 points instead of 17), and the four children of a node are adjacent (32 bytes,
// one or two cache lines); the heap of a shard (8 bytes a point) is larger than the
// core's L2, and those misses, not the comparisons, are what a level costs.
//
// Keys are distinct (they hold the index), so the order of equal keys never matters.
//
// The keys live either in the heap's own vector (reserve()) or in memory the caller owns
// (the constructor with a pointer: the distributed coreset keeps a rank's heap in a state
// tensor between steps, and reads size() back after the step).

#include <algorithm>
#include <cstddef>
#include <vector>

#include "../pack_key.h"

namespace patchcore_fast {

class KeyHeap {
 public:
  KeyHeap() = default;
  // A heap over keys[0 .. size); the caller's memory must have room for every key that
  // push() will add.
  KeyHeap(ArgmaxKey* keys, size_t size) : a_(keys), n_(size) {}
  KeyHeap(const KeyHeap&) = delete;
  KeyHeap& operator=(const KeyHeap&) = delete;

  bool empty() const { return n_ == 0; }
  size_t size() const { return n_; }
  // Room for n keys in the heap's own storage (before the first key is added).
  void reserve(size_t n) {
    own_.resize(n);
    a_ = own_.data();
  }

  // The largest key; the heap must not be empty.
  ArgmaxKey top() const { return a_[0]; }

  // The largest key below the top (the top's largest child), 0 when there is none.
  ArgmaxKey second() const {
    ArgmaxKey m = 0;
    const size_t end = std::min<size_t>(5, n_);
    for (size_t c = 1; c < end; ++c) m = std::max(m, a_[c]);
    return m;
  }

  // Replaces the top by `key` (any value) and restores the order.
  void replace_top(ArgmaxKey key) { sift_down(0, key); }

  // Removes the top.
  void pop_top() {
    const ArgmaxKey key = a_[--n_];
    if (n_ != 0) sift_down(0, key);
  }

  // Room is the caller's: its heaps hold at most one key per point of the shard.
  void push(ArgmaxKey key) {
    size_t p = n_++;
    while (p > 0) {
      const size_t parent = (p - 1) / 4;
      if (a_[parent] >= key) break;
      a_[p] = a_[parent];
      p = parent;
    }
    a_[p] = key;
  }

  // Adds keys in any order; call build() before the first top().
  void append(ArgmaxKey key) { a_[n_++] = key; }

  void build() {
    if (n_ < 2) return;
    for (size_t p = (n_ - 2) / 4 + 1; p-- > 0;) sift_down(p, a_[p]);
  }

 private:
  // Moves `key` down from node p: each level, the largest child moves up while it is
  // larger than key.
  void sift_down(size_t p, ArgmaxKey key) {
    const size_t n = n_;
    while (true) {
      const size_t first = 4 * p + 1;
      if (first >= n) break;
      size_t best = first;
      ArgmaxKey best_key = a_[first];
      const size_t end = std::min(first + 4, n);
      for (size_t c = first + 1; c < end; ++c) {
        if (a_[c] > best_key) {
          best_key = a_[c];
          best = c;
        }
      }
      if (best_key <= key) break;
      a_[p] = best_key;
      p = best;
    }
    a_[p] = key;
  }

  ArgmaxKey* a_ = nullptr;
  size_t n_ = 0;
  std::vector<ArgmaxKey> own_;
};

}  // namespace patchcore_fast
