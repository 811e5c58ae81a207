// comm.c: see comm.h. Every MPI call is checked; a failure names the rank and the call and aborts the job.
#include "comm.h"

#include <limits.h>
#include <string.h>

#include "util.h"

#ifdef USE_MPI
#include <mpi.h>

#define MPI_CHECK(c, call)                                                                        \
    do {                                                                                          \
        int rc_ = (call);                                                                         \
        if (rc_ != MPI_SUCCESS) {                                                                 \
            char msg_[MPI_MAX_ERROR_STRING];                                                      \
            int len_ = 0;                                                                         \
            MPI_Error_string(rc_, msg_, &len_);                                                   \
            DIE("rank %d: %s failed: %s", (c)->rank, #call, msg_);                                \
        }                                                                                         \
    } while (0)

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
    MPI_Comm local;
    MPI_CHECK(c, MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &local));
    MPI_CHECK(c, MPI_Comm_rank(local, &c->local_rank));
    MPI_CHECK(c, MPI_Comm_size(local, &c->local_world));
    MPI_CHECK(c, MPI_Comm_free(&local));
}

void comm_finalize(Comm *c) {
    if (c->mpi) MPI_CHECK(c, MPI_Finalize());
    c->mpi = 0;
}

// MPI counts are int: large buffers go in chunks.
#define MPI_CHUNK ((size_t)1 << 30)

void comm_allreduce_sum_f32(Comm *c, float *buf, size_t n) {
    if (c->world == 1) return;
    for (size_t off = 0; off < n; off += MPI_CHUNK) {
        int cnt = (int)(n - off < MPI_CHUNK ? n - off : MPI_CHUNK);
        MPI_CHECK(c, MPI_Allreduce(MPI_IN_PLACE, buf + off, cnt, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD));
    }
}

void comm_allreduce_sum_f64(Comm *c, double *buf, size_t n) {
    if (c->world == 1) return;
    for (size_t off = 0; off < n; off += MPI_CHUNK) {
        int cnt = (int)(n - off < MPI_CHUNK ? n - off : MPI_CHUNK);
        MPI_CHECK(c, MPI_Allreduce(MPI_IN_PLACE, buf + off, cnt, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
    }
}

void comm_bcast(Comm *c, void *buf, size_t bytes, int root) {
    if (c->world == 1) return;
    for (size_t off = 0; off < bytes; off += MPI_CHUNK) {
        int cnt = (int)(bytes - off < MPI_CHUNK ? bytes - off : MPI_CHUNK);
        MPI_CHECK(c, MPI_Bcast((char *)buf + off, cnt, MPI_BYTE, root, MPI_COMM_WORLD));
    }
}

void comm_barrier(Comm *c) {
    if (c->world > 1) MPI_CHECK(c, MPI_Barrier(MPI_COMM_WORLD));
}

#else  // single process

void comm_init(Comm *c, int *argc, char ***argv) {
    memset(c, 0, sizeof *c);
    c->world = c->local_world = 1;
}
void comm_finalize(Comm *c) {}
void comm_allreduce_sum_f32(Comm *c, float *buf, size_t n) {}
void comm_allreduce_sum_f64(Comm *c, double *buf, size_t n) {}
void comm_bcast(Comm *c, void *buf, size_t bytes, int root) {}
void comm_barrier(Comm *c) {}

#endif
