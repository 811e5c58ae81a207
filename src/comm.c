// comm.c: see comm.h. Every MPI call is checked; a failure names the rank and the call and aborts the job.
#include "comm.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "status.h"
#include "util.h"

// out += s, elementwise (one fixed order per element whatever the thread count).
static void add_into(float *out, const float *s, size_t n) {
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) out[i] += s[i];
}

#ifdef USE_NCCL
#include <cuda_runtime_api.h>
#include <nccl.h>

#define NCCL_CHECK(c, call)                                                                                      \
    do {                                                                                                         \
        ncclResult_t r_ = (call);                                                                                \
        if (r_ != ncclSuccess) DIE("rank %d: %s failed: %s", (c)->rank, #call, ncclGetErrorString(r_));          \
    } while (0)
#define CUDA_CALL(c, call)                                                                                       \
    do {                                                                                                         \
        cudaError_t e_ = (call);                                                                                 \
        if (e_ != cudaSuccess) DIE("rank %d: %s failed: %s", (c)->rank, #call, cudaGetErrorString(e_));          \
    } while (0)

// The NCCL side of a rank (comm_gpu_init): shared by the MPI build and the single-process build, where a one-rank
// communicator runs only with SD_NCCL_FORCE=1 (to check the NCCL path on a one-GPU machine).
typedef struct {
    int on;                         // comm_gpu_init done: device buffers go through NCCL
    ncclComm_t comm;
    cudaStream_t compute, st;       // the backend's stream; NCCL's own
    cudaEvent_t ev_ready, ev_done;  // compute -> NCCL (a bucket is final); NCCL -> compute (the sums are done)
    int pending;                    // collectives started since the last wait
    // SD_NCCL_FORCE=1 at one rank: a one-rank in-place collective moves no data, so a missing order between the
    // streams would go unseen. Instead each sum or broadcast writes its own slice of this buffer (oop_used floats
    // in use), and the compute stream copies the slices back after its wait on ev_done (`back`), so what the
    // optimizer reads is what NCCL read. Each start also holds the compute stream for 2 ms (a host function), so the
    // kernels of the next buckets are still queued when NCCL is handed them: without the compute -> NCCL order,
    // NCCL would read unfinished gradients and the GPU check (tests/gpu/nccl_np1.sh) fails.
    float *oop;
    size_t oop_n, oop_used;
    struct OopBack {
        void *dst;
        size_t off, bytes;  // off: floats into oop
    } *back;
    int nback, cap_back;
} NcclState;

static int nccl_on(const Comm *c);
static int is_device(const void *p);
static void nccl_start(Comm *c, float *buf, size_t n);
static void nccl_wait_for(Comm *c, const char *what);
static void nccl_bcast_all(Comm *c, void *const *bufs, const size_t *bytes);
static void nccl_destroy(Comm *c);
static int nccl_sum(Comm *c, float *buf, size_t n);
static void nccl_wait_sums(Comm *c);
#endif

#ifdef USE_MPI
#include <mpi.h>

#define MPI_CHECK(c, call)                                                   \
    do {                                                                     \
        int rc_ = (call);                                                    \
        if (rc_ != MPI_SUCCESS) {                                            \
            char msg_[MPI_MAX_ERROR_STRING];                                 \
            int len_ = 0;                                                    \
            MPI_Error_string(rc_, msg_, &len_);                              \
            DIE("rank %d: %s failed: %s", (c)->rank, #call, msg_);           \
        }                                                                    \
    } while (0)

#define TAG_HEARTBEAT 1
#define TAG_CHAIN 2
#define MPI_CHUNK ((size_t)1 << 30)  // MPI counts are int: large buffers go in chunks

struct CommState {
    MPI_Comm hb_comm;  // heartbeats travel apart from the collectives
    MPI_Request *reqs;  // pending bucket all-reduces
    int nreq, cap;
    double wait_s;
    int64_t step;  // this rank's step, for messages
    MPI_Request hb_req;
    double hb_buf[4];     // step, images/s, loader stall, pid
    double *last_heard;   // (world) rank 0: monotonic time each rank's last heartbeat arrived
    double *last_unix;    // (world) rank 0: the same as wall-clock time
    double *last_info;    // (world, 4) rank 0: the payload it carried
    int64_t *last_step;   // (world) rank 0: the step it reported
    int byes;             // rank 0: goodbyes already received while draining (a rank may finalize first)
#ifdef USE_NCCL
    NcclState nc;
#endif
};

void comm_init(Comm *c, int *argc, char ***argv) {
    memset(c, 0, sizeof *c);
    int provided = 0;
    if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
        DIE("MPI_Init_thread failed (is this an Open MPI launch environment?)");
    if (provided < MPI_THREAD_FUNNELED) DIE("MPI provides thread level %d, need MPI_THREAD_FUNNELED", provided);
    c->mpi = 1;
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_CHECK(c, MPI_Comm_rank(MPI_COMM_WORLD, &c->rank));
    MPI_CHECK(c, MPI_Comm_size(MPI_COMM_WORLD, &c->world));
    util_note_rank(c->rank, c->world);
    MPI_Comm local;
    MPI_CHECK(c, MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &local));
    MPI_CHECK(c, MPI_Comm_rank(local, &c->local_rank));
    MPI_CHECK(c, MPI_Comm_size(local, &c->local_world));
    MPI_CHECK(c, MPI_Comm_free(&local));
    CommState *st = xcalloc(sizeof(CommState), "comm state");
    MPI_CHECK(c, MPI_Comm_dup(MPI_COMM_WORLD, &st->hb_comm));
    st->hb_req = MPI_REQUEST_NULL;
    st->last_heard = xcalloc((size_t)c->world * sizeof(double), "heartbeats");
    st->last_unix = xcalloc((size_t)c->world * sizeof(double), "heartbeat times");
    st->last_info = xcalloc((size_t)c->world * 4 * sizeof(double), "heartbeat payloads");
    st->last_step = xcalloc((size_t)c->world * sizeof(int64_t), "heartbeat steps");
    double now = now_sec();
    for (int r = 0; r < c->world; r++) st->last_heard[r] = now;
    c->st = st;
}

void comm_set_timeout(Comm *c, double seconds, const char *key) {
    c->timeout_s = seconds;
    c->timeout_key = key;
}

// Rank 0: record every heartbeat that has arrived.
static void drain_heartbeats(Comm *c) {
    CommState *st = c->st;
    for (;;) {
        int flag = 0;
        MPI_Status s;
        MPI_CHECK(c, MPI_Iprobe(MPI_ANY_SOURCE, TAG_HEARTBEAT, st->hb_comm, &flag, &s));
        if (!flag) return;
        double v[4];
        MPI_CHECK(c, MPI_Recv(v, 4, MPI_DOUBLE, s.MPI_SOURCE, TAG_HEARTBEAT, st->hb_comm, MPI_STATUS_IGNORE));
        if (v[0] < 0) {  // a goodbye, only sent at finalize: counted, or comm_finalize would wait for it forever
            st->byes++;
            continue;
        }
        int r = s.MPI_SOURCE;
        st->last_heard[r] = now_sec();
        st->last_unix[r] = unix_time();
        memcpy(st->last_info + 4 * r, v, sizeof v);
        st->last_step[r] = (int64_t)v[0];
    }
}

// Fails the job after a wait longer than the timeout, naming the silent ranks when this is rank 0.
static void report_timeout(Comm *c, const char *what, double waited) {
    CommState *st = c->st;
    char silent[512] = "";
    if (c->rank == 0) {
        double now = now_sec();
        for (int r = 1; r < c->world; r++)
            if (now - st->last_heard[r] > c->timeout_s * 0.5 || st->last_step[r] < st->step) {
                size_t len = strlen(silent);
                snprintf(silent + len, sizeof silent - len, "%s%d (last heartbeat %.0f s ago, step %lld)",
                         len ? ", " : "", r, now - st->last_heard[r], (long long)st->last_step[r]);
            }
    }
    fprintf(stderr,
            "simplest-dist: error: rank %d waited %.0f s in %s at step %lld (%s); %s%s; stopping the "
            "job\n",
            c->rank, waited, what, (long long)st->step, c->timeout_key ? c->timeout_key : "comm.timeout_s",
            silent[0] ? "unresponsive rank(s): " : "a peer rank is unresponsive or dead", silent);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
}

// Completes requests by polling, so that heartbeats keep flowing and a dead peer ends the job.
static void poll_wait(Comm *c, int n, MPI_Request *reqs, const char *what) {
    double t0 = now_sec();
    for (;;) {
        int done = 0;
        MPI_CHECK(c, MPI_Testall(n, reqs, &done, MPI_STATUSES_IGNORE));
        if (done) return;
        if (c->rank == 0) drain_heartbeats(c);
        double waited = now_sec() - t0;
        if (c->timeout_s > 0 && waited > c->timeout_s) report_timeout(c, what, waited);
        if (waited > 0.02) {  // spin first (each sleep delays a collective round); then yield the core
            struct timespec ts = {0, 50000};
            nanosleep(&ts, NULL);
        }
    }
}

void comm_heartbeat(Comm *c, int64_t step, double images_per_sec, double loader_stall_s) {
    CommState *st = c->st;
    if (!st) return;
    st->step = step;
    if (c->rank == 0) {
        st->last_heard[0] = now_sec();
        st->last_unix[0] = unix_time();
        st->last_step[0] = step;
        st->last_info[0] = (double)step;
        st->last_info[1] = images_per_sec;
        st->last_info[2] = loader_stall_s;
        st->last_info[3] = (double)getpid();
        if (c->world > 1) drain_heartbeats(c);
        return;
    }
    int done = 1;
    if (st->hb_req != MPI_REQUEST_NULL) MPI_CHECK(c, MPI_Test(&st->hb_req, &done, MPI_STATUS_IGNORE));
    if (!done) return;  // rank 0 is behind: do not pile up messages
    st->hb_buf[0] = (double)step;
    st->hb_buf[1] = images_per_sec;
    st->hb_buf[2] = loader_stall_s;
    st->hb_buf[3] = (double)getpid();
    MPI_CHECK(c, MPI_Isend(st->hb_buf, 4, MPI_DOUBLE, 0, TAG_HEARTBEAT, st->hb_comm, &st->hb_req));
}

int comm_rank_info(const Comm *c, int r, int64_t *step, double *heard_unix, double *images_per_sec,
                   double *loader_stall_s, int *pid) {
    const CommState *st = c->st;
    if (!st || st->last_unix[r] == 0.0) return 0;
    *step = st->last_step[r];
    *heard_unix = st->last_unix[r];
    *images_per_sec = st->last_info[4 * r + 1];
    *loader_stall_s = st->last_info[4 * r + 2];
    *pid = (int)st->last_info[4 * r + 3];
    return 1;
}

void comm_finalize(Comm *c) {
    if (!c->mpi) return;
    CommState *st = c->st;
    comm_wait_all(c);
    if (c->world > 1) {  // every rank says goodbye (step -1) so that rank 0 leaves no message unreceived
        if (c->rank == 0) {
            for (int byes = st->byes; byes < c->world - 1;) {
                double v[4];
                MPI_CHECK(c, MPI_Recv(v, 4, MPI_DOUBLE, MPI_ANY_SOURCE, TAG_HEARTBEAT, st->hb_comm,
                                      MPI_STATUS_IGNORE));
                byes += v[0] < 0;
            }
        } else {
            if (st->hb_req != MPI_REQUEST_NULL) MPI_CHECK(c, MPI_Wait(&st->hb_req, MPI_STATUS_IGNORE));
            double bye[4] = {-1.0, 0.0, 0.0, 0.0};
            MPI_CHECK(c, MPI_Send(bye, 4, MPI_DOUBLE, 0, TAG_HEARTBEAT, st->hb_comm));
        }
    }
#ifdef USE_NCCL
    nccl_destroy(c);
#endif
    MPI_CHECK(c, MPI_Comm_free(&st->hb_comm));
    free(st->reqs);
    free(st->last_heard);
    free(st->last_unix);
    free(st->last_info);
    free(st->last_step);
    free(st);
    c->st = NULL;
    MPI_CHECK(c, MPI_Finalize());
    c->mpi = 0;
}

static void allreduce(Comm *c, void *buf, size_t n, size_t esize, MPI_Datatype type, const char *what) {
    if (c->world == 1) return;
    for (size_t off = 0; off < n; off += MPI_CHUNK) {
        int cnt = (int)(n - off < MPI_CHUNK ? n - off : MPI_CHUNK);
        MPI_Request req;
        MPI_CHECK(c, MPI_Iallreduce(MPI_IN_PLACE, (char *)buf + off * esize, cnt, type, MPI_SUM, MPI_COMM_WORLD,
                                    &req));
        poll_wait(c, 1, &req, what);
    }
}

void comm_bcast_all(Comm *c, void *const *bufs, const size_t *bytes, int device) {
#ifdef USE_NCCL
    if (c->world == 1 && !nccl_on(c)) return;
#else
    if (c->world == 1) return;
#endif
    if (device) {
#ifdef USE_NCCL
        CHECK(nccl_on(c), "comm_bcast_all: device buffers need comm_gpu_init");
        nccl_bcast_all(c, bufs, bytes);
        return;
#else
        if (c->world > 1) DIE("rank %d: comm_bcast_all on device buffers in a build without NCCL", c->rank);
        return;
#endif
    }
    if (c->world == 1) return;
    for (int r = 0; r < c->world; r++)
        if (bytes[r]) comm_bcast(c, bufs[r], bytes[r], r);
}

void comm_allreduce_sum_f32(Comm *c, float *buf, size_t n) {
#ifdef USE_NCCL
    if (nccl_sum(c, buf, n)) return;
#endif
    allreduce(c, buf, n, 4, MPI_FLOAT, "an all-reduce");
}

void comm_allreduce_sum_f64(Comm *c, double *buf, size_t n) {
    allreduce(c, buf, n, 8, MPI_DOUBLE, "an all-reduce");
}

void comm_bcast(Comm *c, void *buf, size_t bytes, int root) {
    if (c->world == 1) return;
    for (size_t off = 0; off < bytes; off += MPI_CHUNK) {
        int cnt = (int)(bytes - off < MPI_CHUNK ? bytes - off : MPI_CHUNK);
        MPI_Request req;
        MPI_CHECK(c, MPI_Ibcast((char *)buf + off, cnt, MPI_BYTE, root, MPI_COMM_WORLD, &req));
        poll_wait(c, 1, &req, "a broadcast");
    }
}

void comm_barrier(Comm *c) {
    if (c->world == 1) return;
    MPI_Request req;
    MPI_CHECK(c, MPI_Ibarrier(MPI_COMM_WORLD, &req));
    poll_wait(c, 1, &req, "a barrier");
}

void comm_allreduce_start_f32(Comm *c, float *buf, size_t n) {
#ifdef USE_NCCL
    if (nccl_on(c) && is_device(buf)) {
        nccl_start(c, buf, n);
        return;
    }
#endif
    if (c->world == 1) return;
    CommState *st = c->st;
    for (size_t off = 0; off < n; off += MPI_CHUNK) {
        if (st->nreq == st->cap) {
            st->cap = st->cap ? 2 * st->cap : 64;
            st->reqs = realloc(st->reqs, (size_t)st->cap * sizeof(MPI_Request));
            CHECK(st->reqs, "out of memory for MPI requests");
        }
        int cnt = (int)(n - off < MPI_CHUNK ? n - off : MPI_CHUNK);
        MPI_CHECK(c, MPI_Iallreduce(MPI_IN_PLACE, buf + off, cnt, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD,
                                    &st->reqs[st->nreq++]));
    }
}

void comm_progress(Comm *c) {
    CommState *st = c->st;
    if (c->world == 1 || st->nreq == 0) return;
    int done = 0;
    MPI_CHECK(c, MPI_Testall(st->nreq, st->reqs, &done, MPI_STATUSES_IGNORE));  // drives the non-blocking sums
}

void comm_wait_all(Comm *c) {
    CommState *st = c->st;
#ifdef USE_NCCL
    nccl_wait_sums(c);
#endif
    if (c->world == 1 || st->nreq == 0) return;
    double t0 = now_sec();
    poll_wait(c, st->nreq, st->reqs, "the gradient all-reduce");
    st->wait_s += now_sec() - t0;
    st->nreq = 0;
}

double comm_wait_seconds(const Comm *c) { return c->st ? c->st->wait_s : 0.0; }

// Point-to-point transfer of n floats, polled.
static void chain_xfer(Comm *c, float *buf, size_t n, int peer, int send) {
    for (size_t off = 0; off < n; off += MPI_CHUNK) {
        int cnt = (int)(n - off < MPI_CHUNK ? n - off : MPI_CHUNK);
        MPI_Request req;
        if (send)
            MPI_CHECK(c, MPI_Isend(buf + off, cnt, MPI_FLOAT, peer, TAG_CHAIN, MPI_COMM_WORLD, &req));
        else
            MPI_CHECK(c, MPI_Irecv(buf + off, cnt, MPI_FLOAT, peer, TAG_CHAIN, MPI_COMM_WORLD, &req));
        poll_wait(c, 1, &req, "the deterministic gradient sum");
    }
}

void comm_ordered_sum_f32(Comm *c, float *const *shards, int nlocal, float *out, size_t n) {
    int first = 0;
    if (c->rank == 0) {
        memcpy(out, shards[0], n * sizeof(float));
        first = 1;
    } else {
        chain_xfer(c, out, n, c->rank - 1, 0);  // the running sum of every earlier shard
    }
    for (int i = first; i < nlocal; i++) add_into(out, shards[i], n);
    if (c->rank + 1 < c->world) chain_xfer(c, out, n, c->rank + 1, 1);
    comm_bcast(c, out, n * sizeof(float), c->world - 1);
}

#else  // single process
struct CommState {
    double wait_s;
    int64_t step;
#ifdef USE_NCCL
    NcclState nc;  // SD_NCCL_FORCE=1 only
#endif
};

#ifdef USE_NCCL  // what the shared NCCL wait calls (no peers here: nothing to drain)
static void drain_heartbeats(Comm *c) {}
static void report_timeout(Comm *c, const char *what, double waited) {
    DIE("waited %.0f s in %s (%s)", waited, what, c->timeout_key ? c->timeout_key : "comm.timeout_s");
}
#endif

void comm_init(Comm *c, int *argc, char ***argv) {
    memset(c, 0, sizeof *c);
    c->world = c->local_world = 1;
    c->st = xcalloc(sizeof(CommState), "comm state");
}
void comm_finalize(Comm *c) {
    if (!c->st) return;
#ifdef USE_NCCL
    nccl_destroy(c);
#endif
    free(c->st);
    c->st = NULL;
}
void comm_set_timeout(Comm *c, double seconds, const char *key) {
    c->timeout_s = seconds;
    c->timeout_key = key;
}
void comm_allreduce_sum_f32(Comm *c, float *buf, size_t n) {
#ifdef USE_NCCL
    nccl_sum(c, buf, n);
#endif
}
void comm_allreduce_sum_f64(Comm *c, double *buf, size_t n) {}
void comm_bcast(Comm *c, void *buf, size_t bytes, int root) {}
void comm_bcast_all(Comm *c, void *const *bufs, const size_t *bytes, int device) {
#ifdef USE_NCCL
    if (device && nccl_on(c)) nccl_bcast_all(c, bufs, bytes);
#endif
}
void comm_barrier(Comm *c) {}
void comm_allreduce_start_f32(Comm *c, float *buf, size_t n) {
#ifdef USE_NCCL
    if (nccl_on(c) && is_device(buf)) nccl_start(c, buf, n);
#endif
}
void comm_progress(Comm *c) {}
void comm_wait_all(Comm *c) {
#ifdef USE_NCCL
    nccl_wait_sums(c);
#endif
}
double comm_wait_seconds(const Comm *c) { return c->st ? c->st->wait_s : 0.0; }
void comm_heartbeat(Comm *c, int64_t step, double images_per_sec, double loader_stall_s) {}
int comm_rank_info(const Comm *c, int r, int64_t *step, double *heard_unix, double *images_per_sec,
                   double *loader_stall_s, int *pid) {
    return 0;
}

void comm_ordered_sum_f32(Comm *c, float *const *shards, int nlocal, float *out, size_t n) {
    memcpy(out, shards[0], n * sizeof(float));
    for (int i = 1; i < nlocal; i++) add_into(out, shards[i], n);
}

#endif

// ---------------------------------------------------------------- NCCL (both builds)

int comm_nccl_forced(void) {
    const char *e = getenv("SD_NCCL_FORCE");
    return e && !strcmp(e, "1");
}

#ifdef USE_NCCL
static int nccl_on(const Comm *c) { return c->st && c->st->nc.on; }

static int is_device(const void *p) {
    struct cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return a.type == cudaMemoryTypeDevice;
}

// The forced one-rank mode (see NcclState.oop): a slice of `bytes` for one collective's output, to be copied back
// into dst on the compute stream at the next wait. The buffer grows stream-ordered on NCCL's stream, keeping the
// slices in use.
static void *oop_slice(Comm *c, void *dst, size_t bytes) {
    NcclState *nc = &c->st->nc;
    size_t nf = (bytes + 3) / 4, off = nc->oop_used;
    if (off + nf > nc->oop_n) {
        size_t want = off + nf > 2 * nc->oop_n ? off + nf : 2 * nc->oop_n;
        float *grown;
        CUDA_CALL(c, cudaMallocAsync((void **)&grown, want * sizeof(float), nc->st));
        if (nc->oop) {
            if (off) CUDA_CALL(c, cudaMemcpyAsync(grown, nc->oop, off * sizeof(float), cudaMemcpyDeviceToDevice, nc->st));
            CUDA_CALL(c, cudaFreeAsync(nc->oop, nc->st));
        }
        nc->oop = grown;
        nc->oop_n = want;
    }
    if (nc->nback == nc->cap_back) {
        nc->cap_back = nc->cap_back ? 2 * nc->cap_back : 32;
        nc->back = realloc(nc->back, (size_t)nc->cap_back * sizeof *nc->back);
        CHECK(nc->back, "out of memory for the NCCL copy-back list");
    }
    nc->back[nc->nback++] = (struct OopBack){dst, off, bytes};
    nc->oop_used = off + nf;
    return nc->oop + off;
}

static void hold_2ms(void *arg) {
    (void)arg;
    struct timespec ts = {0, 2000000};
    nanosleep(&ts, NULL);
}

// Starts an in-place NCCL sum of a device buffer once the compute stream has finished writing it.
static void nccl_start(Comm *c, float *buf, size_t n) {
    NcclState *nc = &c->st->nc;
    CUDA_CALL(c, cudaEventRecord(nc->ev_ready, nc->compute));
    CUDA_CALL(c, cudaStreamWaitEvent(nc->st, nc->ev_ready, 0));
    if (c->world == 1) {  // forced one-rank mode (see NcclState.oop)
        NCCL_CHECK(c, ncclAllReduce(buf, oop_slice(c, buf, n * sizeof(float)), n, ncclFloat, ncclSum, nc->comm, nc->st));
        CUDA_CALL(c, cudaLaunchHostFunc(nc->compute, hold_2ms, NULL));
    } else {
        NCCL_CHECK(c, ncclAllReduce(buf, buf, n, ncclFloat, ncclSum, nc->comm, nc->st));
    }
    nc->pending++;
}

// Waits for every started NCCL collective by polling, with the heartbeats and the timeout; the compute stream is
// then ordered after them.
static void nccl_wait_for(Comm *c, const char *what) {
    NcclState *nc = &c->st->nc;
    if (!nc->pending) return;
    CUDA_CALL(c, cudaEventRecord(nc->ev_done, nc->st));
    double t0 = now_sec();
    for (;;) {
        cudaError_t q = cudaEventQuery(nc->ev_done);
        if (q == cudaSuccess) break;
        if (q != cudaErrorNotReady) DIE("rank %d: %s failed: %s", c->rank, what, cudaGetErrorString(q));
        ncclResult_t async = ncclSuccess;
        NCCL_CHECK(c, ncclCommGetAsyncError(nc->comm, &async));
        if (async != ncclSuccess) DIE("rank %d: NCCL reports %s during %s", c->rank, ncclGetErrorString(async), what);
        if (c->rank == 0 && c->world > 1) drain_heartbeats(c);
        double waited = now_sec() - t0;
        // No ncclCommAbort first: it can stall on the very state that timed out, and report_timeout's exit ends
        // this process's NCCL work anyway.
        if (c->timeout_s > 0 && waited > c->timeout_s) report_timeout(c, what, waited);
        if (waited > 0.02) {
            struct timespec ts = {0, 50000};
            nanosleep(&ts, NULL);
        }
    }
    CUDA_CALL(c, cudaStreamWaitEvent(nc->compute, nc->ev_done, 0));
    for (int i = 0; i < nc->nback; i++)  // forced one-rank mode: the results reach their buffers on the compute stream
        CUDA_CALL(c, cudaMemcpyAsync(nc->back[i].dst, nc->oop + nc->back[i].off, nc->back[i].bytes,
                                     cudaMemcpyDeviceToDevice, nc->compute));
    nc->nback = 0;
    nc->oop_used = 0;  // reused by NCCL's stream only after its next wait on the compute stream (ev_ready)
    nc->pending = 0;
}

// A blocking f32 sum through NCCL when it is bound and buf is device memory: 1 if done so.
static int nccl_sum(Comm *c, float *buf, size_t n) {
    if (!nccl_on(c) || !is_device(buf)) return 0;
    nccl_start(c, buf, n);
    nccl_wait_sums(c);
    return 1;
}

// Waits for the sums started so far (the time counts as exposed communication).
static void nccl_wait_sums(Comm *c) {
    if (!nccl_on(c) || !c->st->nc.pending) return;
    double t0 = now_sec();
    nccl_wait_for(c, "the NCCL gradient all-reduce");
    c->st->wait_s += now_sec() - t0;
}

// Every owner's buffer, one ncclBroadcast each (root = owner) inside one group (spec/shampoo.md §3.3).
static void nccl_bcast_all(Comm *c, void *const *bufs, const size_t *bytes) {
    NcclState *nc = &c->st->nc;
    CUDA_CALL(c, cudaEventRecord(nc->ev_ready, nc->compute));
    CUDA_CALL(c, cudaStreamWaitEvent(nc->st, nc->ev_ready, 0));
    if (c->world == 1 && bytes[0]) {  // forced one-rank mode: out of place as well (see NcclState.oop)
        NCCL_CHECK(c, ncclBroadcast(bufs[0], oop_slice(c, bufs[0], bytes[0]), bytes[0], ncclChar, 0, nc->comm, nc->st));
    } else if (c->world > 1) {
        NCCL_CHECK(c, ncclGroupStart());
        for (int r = 0; r < c->world; r++)
            if (bytes[r]) NCCL_CHECK(c, ncclBroadcast(bufs[r], bufs[r], bytes[r], ncclChar, r, nc->comm, nc->st));
        NCCL_CHECK(c, ncclGroupEnd());
    }
    nc->pending++;
    nccl_wait_for(c, "the NCCL Shampoo root broadcast");
}

static void nccl_destroy(Comm *c) {
    NcclState *nc = &c->st->nc;
    if (!nc->on) return;
    if (nc->oop) {
        cudaDeviceSynchronize();  // the last copy-backs ran on the compute stream (the backend may be gone)
        cudaFree(nc->oop);
    }
    free(nc->back);
    ncclCommDestroy(nc->comm);
    cudaEventDestroy(nc->ev_ready);
    cudaEventDestroy(nc->ev_done);
    cudaStreamDestroy(nc->st);
    nc->on = 0;
}

int comm_gpu_init(Comm *c, void *stream) {
    int force = comm_nccl_forced();
    if (c->world == 1 && !force) return 1;
    CHECK(c->st, "comm_gpu_init before comm_init");
    NcclState *nc = &c->st->nc;
    ncclUniqueId id;
    if (c->rank == 0) NCCL_CHECK(c, ncclGetUniqueId(&id));
    if (c->world > 1) comm_bcast(c, &id, sizeof id, 0);
    // ncclCommInitRank blocks until every peer has joined, and NCCL may connect to peers only at a first
    // collective, inside a host call: neither can poll, so a watchdog bounds both with comm.timeout_s.
    Watchdog *wd = watchdog_start(c->timeout_s, "NCCL setup (ncclCommInitRank and a first all-reduce)",
                                  "comm.timeout_s");
    // NCCL >= 2.22 connects each algorithm's peers (and allocates NVLS buffers) at its first use, inside a host call
    // of a training step with no bound; connected at init instead, that waiting falls under the watchdog. The
    // price: buffers of algorithms the run may never pick are allocated too (NVLS's on NVSwitch nodes; the gradient
    // sums would mostly pick it anyway). A user's own setting wins (NCCL_RUNTIME_CONNECT=1 restores lazy connects).
    setenv("NCCL_RUNTIME_CONNECT", "0", 0);
    NCCL_CHECK(c, ncclCommInitRank(&nc->comm, c->world, id, c->rank));
    nc->compute = (cudaStream_t)stream;
    CUDA_CALL(c, cudaStreamCreateWithFlags(&nc->st, cudaStreamNonBlocking));
    CUDA_CALL(c, cudaEventCreateWithFlags(&nc->ev_ready, cudaEventDisableTiming));
    CUDA_CALL(c, cudaEventCreateWithFlags(&nc->ev_done, cudaEventDisableTiming));
    float *one;
    CUDA_CALL(c, cudaMalloc((void **)&one, sizeof(float)));
    CUDA_CALL(c, cudaMemsetAsync(one, 0, sizeof(float), nc->st));
    NCCL_CHECK(c, ncclAllReduce(one, one, 1, ncclFloat, ncclSum, nc->comm, nc->st));
    nc->pending = 1;  // polled like any sum: an asynchronous NCCL error is reported now, not after the timeout
    nccl_wait_for(c, "the first NCCL all-reduce");
    CUDA_CALL(c, cudaFree(one));
    watchdog_stop(wd);
    nc->on = 1;
    if (c->world == 1)
        fprintf(stderr, "simplest-dist: SD_NCCL_FORCE=1: a one-rank NCCL communicator; gradient sums and Shampoo "
                        "root broadcasts go through NCCL's stream and events as on several GPUs (out of place, "
                        "copied back on the compute stream)\n");
    return 1;
}

int comm_device_collectives(const Comm *c) { return nccl_on(c) || c->world == 1; }
#else
int comm_gpu_init(Comm *c, void *stream) { return c->world == 1 && !comm_nccl_forced(); }
int comm_device_collectives(const Comm *c) { return c->world == 1; }
#endif
