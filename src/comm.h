// comm.h: ranks and collectives. MPI when built with USE_MPI (launched under mpirun/srun, or alone); a single
// process otherwise. The rank always comes from MPI, never from a scheduler's environment variables.
//
// No collective ever blocks inside MPI: each one is started non-blocking and completed by a polling wait that also
// keeps the heartbeats. Every rank sends rank 0 a heartbeat each step; a rank that waits longer than the timeout
// stops the job with one line naming the ranks it has not heard from (rank 0) or the operation it waited in
// (other ranks). A rank that dies is reported by mpirun itself, which then ends the job.
#pragma once
#include <stddef.h>
#include <stdint.h>

typedef struct CommState CommState;

typedef struct {
    int rank, world, local_rank, local_world;
    int mpi;           // 1 when MPI is initialized and used
    double timeout_s;  // longest wait for a peer before the job is failed (0 = forever)
    const char *timeout_key;  // the config key that set it, for the message (NULL: "comm.timeout_s")
    CommState *st;     // pending requests, heartbeat bookkeeping
} Comm;

void comm_init(Comm *c, int *argc, char ***argv);
void comm_finalize(Comm *c);
// The longest wait for a peer from now on, and the config key that a timeout message names.
void comm_set_timeout(Comm *c, double seconds, const char *key);

// Blocking (but polled) collectives on host-visible memory.
void comm_allreduce_sum_f32(Comm *c, float *buf, size_t n);
void comm_allreduce_sum_f64(Comm *c, double *buf, size_t n);
void comm_bcast(Comm *c, void *buf, size_t bytes, int root);
void comm_barrier(Comm *c);

// Bucketed gradient all-reduce that overlaps compute: start any number of in-place sums, poke progress while
// computing, then wait for all of them.
void comm_allreduce_start_f32(Comm *c, float *buf, size_t n);
void comm_progress(Comm *c);
void comm_wait_all(Comm *c);
double comm_wait_seconds(const Comm *c);  // time spent in comm_wait_all so far (exposed communication)

// GPU data parallel: binds an NCCL communicator (its unique id broadcast over MPI) to the CUDA backend's compute
// stream (`stream`, a cudaStream_t) and gives it a stream of its own. From then on the f32 all-reduces above run
// through NCCL when their buffer is device memory: a bucket starts on the NCCL stream once the compute stream has
// produced it (an event), and comm_wait_all polls its completion (heartbeats and the timeout keep working).
// Returns 1, or 0 when this build has no NCCL (USE_NCCL: CUDA with nccl.h); with one rank it does nothing unless
// comm_nccl_forced().
int comm_gpu_init(Comm *c, void *stream);

// Every rank r broadcasts bufs[r] (bytes[r] bytes; 0 = nothing) to all ranks, in one call: Shampoo's root
// broadcast (spec/shampoo.md §3.3). device = 1: the buffers are CUDA device memory, broadcast by NCCL inside one
// group on its stream once the compute stream has written them (needs comm_device_collectives); else host memory,
// MPI_Bcast owner by owner. Blocking but polled (heartbeats, timeout); the compute stream is ordered after it.
void comm_bcast_all(Comm *c, void *const *bufs, const size_t *bytes, int device);
// 1 if comm_bcast_all takes device buffers: NCCL is bound (comm_gpu_init) or there is only one rank.
int comm_device_collectives(const Comm *c);
// SD_NCCL_FORCE=1: comm_gpu_init binds NCCL even with one rank (a one-rank communicator, no MPI needed), so that
// the NCCL path (bucketed sums on NCCL's stream, events, polled waits, grouped root broadcasts) runs and can be
// checked on a one-GPU machine (tests/gpu/run.sh); a one-rank sum or broadcast leaves the bits unchanged.
int comm_nccl_forced(void);

// Deterministic sum: rank r holds nlocal consecutive shards of a global sequence of world * nlocal shards; out gets
// ((s_0 + s_1) + s_2) + ... in global shard order on every rank, bit-identical at any world size.
void comm_ordered_sum_f32(Comm *c, float *const *shards, int nlocal, float *out, size_t n);

// Called once per step by every rank: the heartbeat to rank 0, carrying this rank's step, speed (images/s) and
// loader stall (s). Never blocks; if rank 0 has not taken the previous one yet, this one is skipped.
void comm_heartbeat(Comm *c, int64_t step, double images_per_sec, double loader_stall_s);
// Rank 0: the last heartbeat of rank r (its step, wall-clock time of arrival, images/s, stall, process id).
// Returns 0 if none has arrived.
int comm_rank_info(const Comm *c, int r, int64_t *step, double *heard_unix, double *images_per_sec,
                   double *loader_stall_s, int *pid);
