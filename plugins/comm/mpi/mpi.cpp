// The MPI communicator (Open MPI): what `mpirun -np N moelab run` trains through.
//
//   allreduce_sum   MPI_Reduce to rank 0, then MPI_Bcast: every rank receives rank 0's bits, so
//                   replicated parameters stay bit-identical across ranks step after step (an
//                   MPI_Allreduce may combine in a different order on different ranks)
//   allgather       MPI_Allgather of bytes
//   alltoall(v)     MPI_Alltoall / MPI_Alltoallv of bytes; zero-byte blocks are ordinary blocks,
//                   and a rank with nothing to send still enters the call
//   split           MPI_Comm_split
//   abort           MPI_Abort on MPI_COMM_WORLD: mpirun ends every rank
//
// The world communicator initialises MPI (MPI_Init_thread, MPI_THREAD_FUNNELED) unless the host
// program did, and finalises it when it goes. Errors come back as RuntimeError with MPI's own
// message (MPI_ERRORS_RETURN), never as MPI's default abort without a word.
//
// libmpi is loaded here, inside a library the engine opened with RTLD_LOCAL; Open MPI's own
// components look its symbols up globally, so the constructor re-opens libmpi RTLD_GLOBAL first.
#include <dlfcn.h>
#include <fmt/format.h>
#include <mpi.h>

#include <climits>
#include <moelab/plugin.hpp>

namespace {

using moelab::DType;
using moelab::RuntimeError;

void check(int code, const char* call) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {0};
  int length = 0;
  MPI_Error_string(code, text, &length);
  throw RuntimeError(fmt::format("{} failed: {}", call, std::string(text, static_cast<size_t>(length))));
}

int count_of(int64_t bytes, const char* call) {
  if (bytes < 0 || bytes > INT_MAX)
    throw RuntimeError(fmt::format("{}: {} bytes in one block; MPI counts stop at {} (2 GiB)", call, bytes, INT_MAX));
  return static_cast<int>(bytes);
}

MPI_Datatype mpi_type(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return MPI_FLOAT;
    case DType::f64:
      return MPI_DOUBLE;
    case DType::i32:
      return MPI_INT32_T;
    case DType::i64:
      return MPI_INT64_T;
    default:
      throw RuntimeError(
          fmt::format("mpi allreduce_sum: dtype {} is not summed (f32, f64, i32, i64 are)", moelab::dtype_name(dtype)));
  }
}

// Open MPI's components, loaded by libmpi itself, resolve libmpi's symbols globally.
void make_libmpi_global() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&MPI_Init_thread), &info) != 0 && info.dli_fname != nullptr)
    dlopen(info.dli_fname, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);  // already loaded: only promoted
}

class MpiComm : public moelab::Comm {
 public:
  explicit MpiComm(const moelab::ParamSet&) {
    make_libmpi_global();
    int initialised = 0;
    check(MPI_Initialized(&initialised), "MPI_Initialized");
    if (!initialised) {
      int provided = 0;
      check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
      owns_mpi_ = true;
    }
    check(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    comm_ = MPI_COMM_WORLD;
    read_rank();
  }
  explicit MpiComm(MPI_Comm comm) : comm_(comm), owns_comm_(true) {
    check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    read_rank();
  }
  ~MpiComm() override {
    if (owns_comm_) MPI_Comm_free(&comm_);
    int finalised = 0;
    MPI_Finalized(&finalised);
    if (owns_mpi_ && !finalised) MPI_Finalize();
  }
  static moelab::ParamSchema schema() { return {}; }

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void allreduce_sum(void* data, int64_t count, DType dtype) override {
    if (count == 0 || size_ == 1) return;
    const int n = count_of(count, "MPI_Reduce");
    const MPI_Datatype type = mpi_type(dtype);
    if (dtype == DType::i32 || dtype == DType::i64) {  // exact in any order
      check(MPI_Allreduce(MPI_IN_PLACE, data, n, type, MPI_SUM, comm_), "MPI_Allreduce");
      return;
    }
    check(MPI_Reduce(rank_ == 0 ? MPI_IN_PLACE : data, rank_ == 0 ? data : nullptr, n, type, MPI_SUM, 0, comm_),
          "MPI_Reduce");
    check(MPI_Bcast(data, n, type, 0, comm_), "MPI_Bcast");
  }
  void allgather(const void* send, int64_t bytes, void* recv) override {
    const int n = count_of(bytes, "MPI_Allgather");
    check(MPI_Allgather(send, n, MPI_BYTE, recv, n, MPI_BYTE, comm_), "MPI_Allgather");
  }
  void alltoall(const void* send, int64_t bytes, void* recv) override {
    const int n = count_of(bytes, "MPI_Alltoall");
    check(MPI_Alltoall(send, n, MPI_BYTE, recv, n, MPI_BYTE, comm_), "MPI_Alltoall");
  }
  void alltoallv(const void* send, const std::vector<int64_t>& send_bytes, void* recv,
                 const std::vector<int64_t>& recv_bytes) override {
    if (send_bytes.size() != static_cast<size_t>(size_) || recv_bytes.size() != static_cast<size_t>(size_))
      throw RuntimeError(fmt::format("MPI_Alltoallv: {} send and {} receive counts for {} ranks", send_bytes.size(),
                                     recv_bytes.size(), size_));
    std::vector<int> sc(static_cast<size_t>(size_)), sd(sc.size()), rc(sc.size()), rd(sc.size());
    int64_t s_at = 0, r_at = 0;
    for (size_t r = 0; r < sc.size(); ++r) {
      sc[r] = count_of(send_bytes[r], "MPI_Alltoallv");
      rc[r] = count_of(recv_bytes[r], "MPI_Alltoallv");
      sd[r] = count_of(s_at, "MPI_Alltoallv displacement");
      rd[r] = count_of(r_at, "MPI_Alltoallv displacement");
      s_at += send_bytes[r];
      r_at += recv_bytes[r];
    }
    // A rank with nothing to send or receive still calls: every rank of comm_ must.
    static char none = 0;
    check(MPI_Alltoallv(s_at > 0 ? send : &none, sc.data(), sd.data(), MPI_BYTE, r_at > 0 ? recv : &none, rc.data(),
                        rd.data(), MPI_BYTE, comm_),
          "MPI_Alltoallv");
  }
  // Point to point: every receive posted, then every send, then one wait for all. One tag: MPI
  // matches messages between two ranks in the order they were posted, which is the pairing.
  void exchange(const void* send, const std::vector<moelab::CommBlock>& sends, void* recv,
                const std::vector<moelab::CommBlock>& recvs) override {
    constexpr int kTag = 0x4d6f;
    requests_.clear();
    for (const moelab::CommBlock& b : recvs) {
      if (b.bytes == 0 || b.rank == rank_) continue;
      check_rank(b.rank, "MPI_Irecv");
      MPI_Request& r = requests_.emplace_back(MPI_REQUEST_NULL);
      check(MPI_Irecv(static_cast<char*>(recv) + b.offset, count_of(b.bytes, "MPI_Irecv"), MPI_BYTE, b.rank, kTag,
                      comm_, &r),
            "MPI_Irecv");
    }
    for (const moelab::CommBlock& b : sends) {
      if (b.bytes == 0 || b.rank == rank_) continue;
      check_rank(b.rank, "MPI_Isend");
      MPI_Request& r = requests_.emplace_back(MPI_REQUEST_NULL);
      check(MPI_Isend(static_cast<const char*>(send) + b.offset, count_of(b.bytes, "MPI_Isend"), MPI_BYTE, b.rank, kTag,
                      comm_, &r),
            "MPI_Isend");
    }
    moelab::copy_own_blocks(send, sends, recv, recvs, "exchange", rank_);  // while the others move
    check(MPI_Waitall(static_cast<int>(requests_.size()), requests_.data(), MPI_STATUSES_IGNORE), "MPI_Waitall");
  }
  void broadcast(void* data, int64_t bytes, int root) override {
    check(MPI_Bcast(data, count_of(bytes, "MPI_Bcast"), MPI_BYTE, root, comm_), "MPI_Bcast");
  }
  void barrier() override { check(MPI_Barrier(comm_), "MPI_Barrier"); }
  std::unique_ptr<moelab::Comm> split(int color, int key) override {
    MPI_Comm out = MPI_COMM_NULL;
    check(MPI_Comm_split(comm_, color, key, &out), "MPI_Comm_split");
    return std::make_unique<MpiComm>(out);
  }
  [[noreturn]] void abort(int code) override {
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);  // MPI_Abort does not return; should it, end this rank anyway
  }

 private:
  void read_rank() {
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }
  void check_rank(int r, const char* call) const {
    if (r < 0 || r >= size_)
      throw RuntimeError(fmt::format("{}: rank {} is not in this communicator of {} ranks", call, r, size_));
  }
  MPI_Comm comm_ = MPI_COMM_NULL;
  std::vector<MPI_Request> requests_;  // kept: one allocation for every exchange
  bool owns_mpi_ = false, owns_comm_ = false;
  int rank_ = 0, size_ = 1;
};

}  // namespace

MOELAB_COMM_PLUGIN(MpiComm, "mpi", "1.0.0",
                   "Open MPI: collectives of the ranks mpirun started (bit-identical sums on every rank)")
