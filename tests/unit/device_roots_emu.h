// device_roots_emu.h: runs the device-roots path of src/shampoo.c on the CPU backend.
//
// The CUDA backend computes Shampoo's roots on the GPU (be->inverse_root, cuSOLVER): the roots go straight into the
// owner's slot of a device broadcast area, the area is broadcast in place (NCCL; staged through the host without
// it), the status headers are read back, and roots are installed by device copies. The CPU backend leaves
// inverse_root NULL and takes the host path (LAPACK into host buffers, MPI_Bcast). The CPU backend's "device" memory
// is host memory, so installing this emulation, which computes each root with the host routine, runs every line of
// the device path with the same root bits: a run must then equal the host path bit for bit. SD_TEST_DEVICE_ROOTS=1
// installs it in the test programs that include this header.
#pragma once
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "shampoo.h"

static long emu_root_calls[2];  // 0: on the compute stream; 1: on a side context (a root thread)

static int emu_inverse_root(Backend *b, const float *F, int n, double bias_corr, int r, double eps, int fp64, float *X,
                            int side) {
    (void)b;
    __atomic_add_fetch(&emu_root_calls[side ? 1 : 0], 1, __ATOMIC_RELAXED);
    return shampoo_inverse_root(F, n, bias_corr, r, eps, fp64, X);
}

static int device_roots_from_env(Backend *be) {
    const char *e = getenv("SD_TEST_DEVICE_ROOTS");
    if (e && !strcmp(e, "1")) {
        be->inverse_root = emu_inverse_root;
        return 1;
    }
    return 0;
}
