// The one-process communicator, the tensor wrappers of comm.hpp and the layout of parallel.hpp.
#include "moelab/comm.hpp"

#include <fmt/format.h>

#include <cstdlib>
#include <cstring>

#include "moelab/parallel.hpp"

namespace moelab {
namespace {

class LocalComm : public Comm {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void allreduce_sum(void*, int64_t, DType) override {}
  void allgather(const void* send, int64_t bytes, void* recv) override { copy(send, bytes, recv); }
  void alltoall(const void* send, int64_t bytes, void* recv) override { copy(send, bytes, recv); }
  void alltoallv(const void* send, const std::vector<int64_t>& send_bytes, void* recv,
                 const std::vector<int64_t>& recv_bytes) override {
    MOELAB_CHECK(send_bytes.size() == 1 && recv_bytes.size() == 1 && send_bytes[0] == recv_bytes[0],
                 "local alltoallv: one rank sends {} bytes to itself and receives {}", send_bytes.at(0),
                 recv_bytes.at(0));
    copy(send, send_bytes[0], recv);
  }
  void exchange(const void* send, const std::vector<CommBlock>& sends, void* recv,
                const std::vector<CommBlock>& recvs) override {
    copy_own_blocks(send, sends, recv, recvs, "local exchange");
  }
  void broadcast(void*, int64_t, int root) override {
    MOELAB_CHECK(root == 0, "local broadcast from rank {} of 1", root);
  }
  void barrier() override {}
  std::unique_ptr<Comm> split(int, int) override { return std::make_unique<LocalComm>(); }
  [[noreturn]] void abort(int code) override { std::_Exit(code); }

 private:
  static void copy(const void* from, int64_t bytes, void* to) {
    if (bytes > 0 && from != to) std::memmove(to, from, static_cast<size_t>(bytes));
  }
};

}  // namespace

void copy_own_blocks(const void* send, const std::vector<CommBlock>& sends, void* recv,
                     const std::vector<CommBlock>& recvs, const char* what, int self) {
  std::vector<const CommBlock*> out, in;
  for (const CommBlock& b : sends)
    if (b.rank == self && b.bytes > 0) out.push_back(&b);
  for (const CommBlock& b : recvs)
    if (b.rank == self && b.bytes > 0) in.push_back(&b);
  if (out.size() != in.size())
    throw RuntimeError(
        fmt::format("{}: {} non-empty blocks to this rank itself, {} from it", what, out.size(), in.size()));
  for (size_t k = 0; k < out.size(); ++k) {
    if (out[k]->bytes != in[k]->bytes)
      throw RuntimeError(fmt::format("{}: block {} to this rank itself has {} bytes, and {} are expected", what, k,
                                     out[k]->bytes, in[k]->bytes));
    std::memmove(static_cast<char*>(recv) + in[k]->offset, static_cast<const char*>(send) + out[k]->offset,
                 static_cast<size_t>(out[k]->bytes));
  }
}

std::unique_ptr<Comm> make_local_comm() {
  return std::make_unique<LocalComm>();
}

void allreduce_sum(Comm& comm, Tensor& t) {
  if (comm.size() == 1 || t.numel() == 0) return;
  MOELAB_CHECK(t.device() == DeviceKind::cpu, "allreduce of a tensor on {}: the comm plugins take host memory",
               device_name(t.device()));
  comm.allreduce_sum(t.raw(), t.numel(), t.dtype());
}

Tensor allgather_rows(Comm& comm, const Tensor& t) {
  MOELAB_CHECK(t.device() == DeviceKind::cpu, "allgather of a tensor on {}: the comm plugins take host memory",
               device_name(t.device()));
  Shape shape = t.shape();
  MOELAB_CHECK(!shape.empty(), "allgather_rows of a scalar");
  shape[0] *= comm.size();
  Tensor out = host_tensor(t.dtype(), shape);
  comm.allgather(t.raw(), static_cast<int64_t>(t.bytes()), out.raw());
  return out;
}

Parallel::Parallel()
    : world_(make_local_comm()), expert_group_(make_local_comm()), expert_replicas_(make_local_comm()) {}

Parallel::Parallel(std::shared_ptr<Comm> world, int64_t expert) : world_(std::move(world)), expert_(expert) {
  const int size = world_->size();
  if (expert < 1 || size % expert != 0)
    throw UsageError(fmt::format("parallel.expert = {} does not divide the {} ranks of the run", expert, size));
  const int rank = world_->rank();
  const int e = static_cast<int>(expert);
  expert_group_ = world_->split(rank / e, rank % e);     // the ranks of one replica
  expert_replicas_ = world_->split(rank % e, rank / e);  // the ranks holding the same experts
}

const Parallel& single_process() {
  static const Parallel* one = new Parallel();  // never destroyed: modules may outlive statics
  return *one;
}

}  // namespace moelab
