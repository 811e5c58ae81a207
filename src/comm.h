// comm.h: ranks and collectives. MPI when built with USE_MPI (and launched under mpirun/srun or alone); a single
// process otherwise. The rank always comes from MPI, never from a scheduler's environment variables.
#pragma once
#include <stddef.h>

typedef struct {
    int rank, world, local_rank, local_world;
    int mpi;  // 1 when MPI is initialized and used
} Comm;

void comm_init(Comm *c, int *argc, char ***argv);
void comm_finalize(Comm *c);
// In-place sum over ranks of n fp32 values in host-visible memory (the CPU backend's buffers).
void comm_allreduce_sum_f32(Comm *c, float *buf, size_t n);
void comm_allreduce_sum_f64(Comm *c, double *buf, size_t n);
void comm_bcast(Comm *c, void *buf, size_t bytes, int root);
void comm_barrier(Comm *c);
