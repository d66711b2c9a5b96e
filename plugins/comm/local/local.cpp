// The one-process communicator: rank 0 of 1, every collective a copy (the engine's own, from
// moelab/parallel.hpp). What a run uses when it is not started by mpirun; every single-process
// path runs through it unchanged.
#include <cstdlib>
#include <moelab/parallel.hpp>
#include <moelab/plugin.hpp>

namespace {

class LocalComm : public moelab::Comm {
 public:
  explicit LocalComm(const moelab::ParamSet&) : inner_(moelab::make_local_comm()) {}
  static moelab::ParamSchema schema() { return {}; }

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  void allreduce_sum(void* data, int64_t count, moelab::DType dtype) override {
    inner_->allreduce_sum(data, count, dtype);
  }
  void allgather(const void* send, int64_t bytes, void* recv) override { inner_->allgather(send, bytes, recv); }
  void alltoall(const void* send, int64_t bytes, void* recv) override { inner_->alltoall(send, bytes, recv); }
  void alltoallv(const void* send, const std::vector<int64_t>& send_bytes, void* recv,
                 const std::vector<int64_t>& recv_bytes) override {
    inner_->alltoallv(send, send_bytes, recv, recv_bytes);
  }
  void exchange(const void* send, const std::vector<moelab::CommBlock>& sends, void* recv,
                const std::vector<moelab::CommBlock>& recvs) override {
    inner_->exchange(send, sends, recv, recvs);
  }
  void broadcast(void* data, int64_t bytes, int root) override { inner_->broadcast(data, bytes, root); }
  void barrier() override { inner_->barrier(); }
  std::unique_ptr<moelab::Comm> split(int color, int key) override { return inner_->split(color, key); }
  [[noreturn]] void abort(int code) override {
    inner_->abort(code);
    std::_Exit(code);  // not reached: the engine's abort ends the process
  }

 private:
  std::unique_ptr<moelab::Comm> inner_;
};

}  // namespace

MOELAB_COMM_PLUGIN(LocalComm, "local", "1.0.0", "one process: rank 0 of 1, every collective a copy")
