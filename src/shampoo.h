// shampoo.h: Distributed Shampoo with Adam grafting, as spec/shampoo.md: parameters merged and cut into blocks,
// Kronecker-factor statistics kept only by each block's owner rank, inverse roots by fp64 (or fp32) symmetric
// eigendecomposition every f steps, broadcast owner by owner so that every rank applies every block's roots and
// the replicas stay bit-identical. The block table is derived from the model's parameter table.
#pragma once
#include <stddef.h>
#include <pthread.h>
#include <stdint.h>

#include "comm.h"
#include "model.h"

typedef struct {
    double lr0, weight_decay;
    int decoupled;                 // weight_decay_mode "decoupled" (else "l2")
    double beta1, beta2;           // first moment; factor EMA
    double eps;                    // added to eigenvalues at root time
    int frequency;                 // f: roots every f steps
    int start_step;                // S: graft-only through step S
    int max_dim;                   // b: max preconditioner dimension
    double graft_beta2, graft_eps;  // Adam grafting
    int root_fp64;                 // root_dtype "fp64" (else "fp32")
    int one_d_adam;                // one_d "adam" (else "full")
    int root_delay;                // d in 0 .. frequency: roots computed at step t are used from t + d
    int root_threads;              // LAPACK threads for roots
    int apply_owners;              // apply "owners": each owner computes its blocks' steps, all-gathered every step
    int check_replicas;            // debug (spec §3.4 item 5, P16): checksum the roots after every broadcast and the
                                   // parameters at every refresh step across ranks (also SD_SHAMPOO_CHECK=1)
} ShampooConfig;

typedef struct {
    int param;          // index into the model's tensor table
    int order;          // 1 or 2
    int rows, cols;     // block shape (cols = 1 for order 1)
    size_t offset;      // float offset of the block's first element in params/grads
    int ld;             // row stride of the merged [m, n] view (1 for order 1)
    int dim[2];         // factor sizes n_0 (= rows) and n_1 (= cols, order 2)
    size_t root_off[2];  // float offsets of the roots in the packed root store (every rank)
    size_t fac_off[2];   // float offsets of the factors in this rank's factor store (owner only; else unused)
    int owner;           // rank that keeps the statistics and computes the roots
    size_t dir_off;      // apply "owners": float offset of the block's step in the direction buffer
    int has_roots;       // roots installed at least once (identical on every rank)
    int fails;           // consecutive failed decompositions (identical on every rank)
    int inject;          // test hook: the next refresh of this block fails (owner only reads it)
    double cost;         // sum of n_k^3 (for the ownership balance)
} ShampooBlock;

typedef struct {
    ShampooConfig cfg;
    Model *model;
    Comm *comm;
    ShampooBlock *blocks;
    int nblocks;
    int64_t t;       // steps taken
    float *m, *v;    // device (num_params): first moment, graft second moment
    float *G;        // device (num_params): this step's clipped gradient with L2 decay
    float *roots;    // device: every block's roots, packed in block order
    size_t root_floats;
    struct RootJob *job;  // root_delay >= 1: the refresh running on `thread` since step job->t, else NULL
    pthread_t thread;
    double refresh_t0;
    float *factors;  // device: the owned blocks' factors
    size_t factor_floats;
    float *scratch;  // device: the batched update's work space, 4 chunks of chunk_floats
    size_t scratch_floats, chunk_floats;
    struct ShampooPlan *plan;   // the update's block groups (same shape and kind), rebuilt when a block's kind changes
    struct ShampooPlan *fplan;  // the statistics' groups of owned blocks (built once)
    struct ShampooPlan *aplan;  // apply "owners": every block's group, to add the gathered steps (with plan)
    // apply "owners": the blocks' steps, owner segments back to back (dseg[r]: owner r's first float, world + 1
    // entries); dirs_host stages them on a device backend without NCCL.
    float *dirs, *dirs_host;
    size_t *dseg;
    signed char *kind;          // (nblocks) this step's kind of each block, compared with the plan's
    // Device roots (the backend has inverse_root): the owners' packed buffers back to back in rank order, broadcast
    // in place; area_off[r] is owner r's byte offset (world + 1 entries). snap: the owned factors as of the refresh
    // step, for a root_delay >= 1 decomposition on the side streams. All NULL on the host-roots path.
    void *area;
    size_t *area_off;
    float *snap;
    int *owned;      // indices of the blocks this rank owns, ascending
    int nowned;
    double max_mean_load;  // ownership balance (logged at start)
    // statistics for status.json and benchmarks
    int64_t refreshes, failed_decomps;
    double last_refresh_s, eig_s, bcast_s, apply_s;
    // root_delay >= 1: time the installing steps waited for their refresh's decompositions (the part that the d
    // steps did not hide; 0 when d is large enough), in all and at the last install
    double root_wait_s, last_root_wait_s;
    double gather_s;                // apply "owners": time in the all-gather of the steps (part of apply_s)
    size_t dirs_sent, dirs_recv;    // apply "owners": bytes of steps this rank sent and received
    size_t bcast_bytes;  // bytes broadcast by all owners so far (status headers included)
    size_t bcast_sent, bcast_recv;  // of those, the bytes this rank sent as an owner and received from the others
    size_t bcast_last;   // bytes broadcast by the last refresh (all owners)
    // replica checks (cfg.check_replicas): how many passed, and the last step checked
    int64_t root_checks, param_checks, last_check_step;
    uint64_t root_hash, param_hash;  // the last agreed checksums (FNV-1a over the 32-bit words)
} Shampoo;

// Root broadcast traffic (spec §5 P18), counted in the broadcast itself.
typedef struct {
    size_t total;           // bytes broadcast by all owners since the start (status headers included)
    size_t sent, received;  // this rank's share of total: as the owner, and from the other owners
    size_t last_refresh;    // bytes of the last refresh
    size_t per_refresh;     // the layout's size of one refresh: 4 * sum_blocks sum_k n_k^2 + 4 * preconditioned blocks
    int64_t refreshes;      // refreshes whose roots have been broadcast
} ShampooTraffic;
void shampoo_traffic(const Shampoo *s, ShampooTraffic *out);

// The refresh step whose roots are being computed behind the steps (root_delay >= 1), or 0 when none is pending.
int64_t shampoo_pending_step(const Shampoo *s);

// Replica checks (spec §3.4 item 5, §5 P16) when cfg.check_replicas or SD_SHAMPOO_CHECK=1: after every root
// broadcast every rank checksums each owner's roots as installed, and at every refresh step the parameters after
// the update; the checksums are compared across ranks (one small all-reduce), and a mismatch stops the run on every
// rank with an error naming the step, the owner and the ranks. Returns 1 if enabled, and the counts of passed
// checks (either pointer may be NULL).
int shampoo_replica_checks(const Shampoo *s, int64_t *root_checks, int64_t *param_checks);

// The update's current plan: the number of block groups (blocks of one kind and shape) and of chunks they run in
// (one round of batched calls each); 0 before the first block step.
int shampoo_update_groups(const Shampoo *s, int *chunks);

// Validates a config; returns 0 or -1 with a one-line reason naming the key.
int shampoo_config_check(const ShampooConfig *c, char *err, size_t errlen);
// Blocks (merge + split of spec §2.1) and ownership (LPT on sum n^3, ties to the lowest rank). owner_map, if
// non-NULL, overrides the ownership (tests: round-robin, reversed, random).
void shampoo_create(Shampoo *s, Model *model, Comm *comm, const ShampooConfig *cfg, const int *owner_map);
void shampoo_free(Shampoo *s);
// One optimizer step at learning rate lr on the all-reduced gradient in model->grads, scaled by grad_scale (the
// clip factor) first. Stops the run on a non-finite factor or a 4th consecutive failed decomposition.
void shampoo_step(Shampoo *s, double lr, double grad_scale);

// Merged shape of a tensor shape under max dimension b (spec §2.1 step 1); returns its order.
int shampoo_merge_dims(const int *shape, int ndim, int b, int *merged);

// X = (F / bias_corr + shift + eps I)^(-1/r) of one factor (spec §2.4), n x n fp32 row-major, computed in fp64
// (or fp32) by symmetric eigendecomposition; X is exactly symmetric. Returns 0, 1 if the decomposition failed or
// gave non-finite values, 2 if F is not finite.
int shampoo_inverse_root(const float *F, int n, double bias_corr, int r, double eps, int fp64, float *root);

// Test hook: the next refresh of block `block` fails its decomposition (as if the eigensolver reported failure).
void shampoo_inject_failure(Shampoo *s, int block);

// Optimizer state (spec §3.5): t, per parameter "<name>.exp_avg" and "<name>.graft_v", per block
// "<name>.block<j>.factor<k>" (gathered from the owners) and ".root<k>" (the roots the next step uses: a pending
// refresh that the next step would install is installed first), and the block flags ".fails" and ".has_roots"
// (I32). A refresh due later (root_delay d > 1) is saved as metadata "pending_t" and its factor snapshot
// "<name>.block<j>.pending_factor<k>"; shampoo_load restarts it, so the resumed run installs the same roots at the
// same step.
// Every rank must call shampoo_save (collective); rank 0 writes path atomically. Returns 0 or -1 (errno).
int shampoo_save(Shampoo *s, const char *path);
// Every rank loads the same file; owners take their factors, whatever the rank count that saved it. Returns 0 or
// -1 with a one-line reason naming the file and tensor.
int shampoo_load(Shampoo *s, const char *path, char *err, size_t errlen);
