// Communicator plugins (kind `comm`): the collectives that many-process training runs on.
//   local   one process; every collective is a copy (plugins/comm/local)
//   mpi     Open MPI (plugins/comm/mpi, built where libopenmpi-dev is installed)
// A run makes one world communicator from the plugin and splits it into the groups of its
// parallel layout (moelab/parallel.hpp). NCCL on GPUs would be a third plugin: only the
// transport changes, not the callers.
//
// The contract every implementation keeps, and the callers rely on so that no run can hang:
// every rank of a communicator calls every collective, in the same order, with the same `count`
// where a count is shared; a rank with nothing to send still calls (with zero counts). Buffers
// are host memory. Failures throw RuntimeError naming the collective.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moelab/tensor.hpp"

namespace moelab {

// Part of a buffer, to or from one rank of a communicator (Comm::exchange).
struct CommBlock {
  int rank = 0;
  int64_t offset = 0;  // bytes into the buffer
  int64_t bytes = 0;
};

class Comm {
 public:
  virtual ~Comm() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // In place, on every rank: data[i] = sum over ranks of data[i]. dtype f32, f64, i32 or i64.
  // Ranks combine in a fixed order, so every rank receives the same bits.
  virtual void allreduce_sum(void* data, int64_t count, DType dtype) = 0;
  // recv [size() * bytes]: rank r's `bytes` at r * bytes.
  virtual void allgather(const void* send, int64_t bytes, void* recv) = 0;
  // send and recv [size() * bytes]: block r of send goes to rank r; block r of recv came from it.
  virtual void alltoall(const void* send, int64_t bytes, void* recv) = 0;
  // Blocks of any size (zero included): send_bytes[r] bytes to rank r, packed in rank order;
  // recv_bytes[r] from rank r, packed the same way. The counts must agree pairwise (exchange them
  // with alltoall first).
  virtual void alltoallv(const void* send, const std::vector<int64_t>& send_bytes, void* recv,
                         const std::vector<int64_t>& recv_bytes) = 0;
  // Blocks of any size to and from any ranks, all in flight at once: sends[i] (sends[i].bytes at
  // send + offset) goes to rank sends[i].rank; recvs[i] lands at recv + offset. Between two
  // ranks the blocks pair in list order: the k-th block this rank lists for rank r is the k-th
  // that r lists from this rank, of the same size (exchange the counts first). Zero-byte blocks
  // are allowed and move nothing; blocks to this rank itself are copies. Unlike alltoallv it can
  // scatter what one rank sends into many places (the MoE exchange's (expert, source) order).
  virtual void exchange(const void* send, const std::vector<CommBlock>& sends, void* recv,
                        const std::vector<CommBlock>& recvs) = 0;
  virtual void broadcast(void* data, int64_t bytes, int root) = 0;
  virtual void barrier() = 0;
  // Ranks with the same color form a new communicator, ordered by key (MPI_Comm_split).
  virtual std::unique_ptr<Comm> split(int color, int key) = 0;
  // Ends every process of the run with `code`, at once: what a rank that failed calls so that the
  // others do not wait for it forever inside a collective.
  [[noreturn]] virtual void abort(int code) = 0;
};

// For implementations of Comm::exchange: the blocks this rank (`self`) sends to itself, copied
// into place (paired in list order, zero-byte ones skipped); RuntimeError, naming `what`, when
// the two lists do not pair.
void copy_own_blocks(const void* send, const std::vector<CommBlock>& sends, void* recv,
                     const std::vector<CommBlock>& recvs, const char* what, int self = 0);

// Convenience wrappers on tensors (host memory for now; the cpu kernel's tensors are host memory).
void allreduce_sum(Comm& comm, Tensor& t);
// Concatenation of every rank's rows, in rank order: [size() * rows, ...]. Every rank's `t` must
// have the same shape.
Tensor allgather_rows(Comm& comm, const Tensor& t);

}  // namespace moelab
