/* online_ngram_state.c: the causal token n-gram channel of the n-gram tilt (spec 05 section 3),
 * bit-exact with the PR #2135 reference (its XOR context key, 34 bits for ids < 8192, and its pair table
 * shared by all contexts, hash collisions included), computed by a multi-threaded partitioned pass
 * instead of the reference's single sequential scan over two 2^27-slot tables.
 *
 * ABI (loaded through ctypes by online_ngram_tilt.py, which compiles this file on first use):
 *
 *   int32_t ngram_abi_version(void);                     returns NGRAM_ABI_VERSION (3)
 *
 *   int32_t ngram_token_channel(const uint16_t *targets,  [n_targets] target ids y[0..T-1], read only
 *                               int64_t n_targets,         T >= 0
 *                               int32_t context_length,    L = order - 1, 1..32
 *                               int32_t n_threads,         >= 1 (1 = no thread is created; at most one
 *                                                          thread per 4096 positions is used)
 *                               uint16_t *out_top,         [n_targets] written: candidate for y[i], 0 if unseen
 *                               float *out_conf,           [n_targets] written: float32(c)/float32(n), 0 if unseen
 *                               int64_t *out_work_bytes);  [1] or NULL: peak bytes this call allocated
 *   returns 0 on success, -1 on bad arguments, -2 when memory runs out (outputs then undefined).
 *
 * Ownership: the caller owns all arrays (C-contiguous, native byte order) and must keep them alive for
 * the call; nothing is retained between calls; every buffer is allocated and freed inside the call.
 *
 * Semantics (spec 05 sections 3.2-3.7): the history is seeded with y[0], so target i >= L-1 has the
 * context h[i-L+1..i] with h[0] = y[0], h[k+1] = y[k]; targets i < L-1 get 0 / 0.0.  With C[] below,
 *   K_i = XOR_j h[i-L+1+j] * C[j]          (context key, unsigned 64-bit wrap-around)
 *   P_i = (K_i * 1000003) ^ (y[i] * C[L % 32])   (pair key)
 *   v_i = #{ j <= i : P_j == P_i }          (shared pair counter right after step i)
 *   over S_i = { j < i : K_j == K_i }: n = |S_i|, c = max v_j, t = y of the first j reaching c.
 * The output is (t, c/n) if n > 0.  Because every step for key K touches only state of key K (and every
 * pair count only state of key P), positions can be split into partitions by a hash of the key and each
 * partition run on its own, in stream order, without changing any result:
 *   1. per thread chunk of positions: histogram of pair-key and context-key partitions
 *   2. stable scatter of pair keys by partition        3. per partition, in order: v = ++count[P]
 *   4. stable scatter of (K, y, v) by context partition 5. per partition, in order: lookup, then update
 *   6. gather the per-entry results back to stream order.
 * Outputs therefore do not depend on the thread count, the partition count or the table sizes.
 * Memory: 16 bytes per position (keys u64, two u32 count arrays) plus one small table per thread
 * (16-byte slots, load <= 1/2, grown on demand), all freed before returning.
 * Build: plain C11 + pthreads; no fast-math (the confidence is one IEEE float32 division).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NGRAM_ABI_VERSION 3
#define MAX_THREADS 256
#define MAX_PARTITION_BITS 12
#define TARGET_PARTITION_ENTRIES 8192 /* keeps one partition's table (16 B/slot, load <= 1/2) in L2 */
#define KEY_BITS 48                   /* K < 2^38 (id < 2^16, C[j] < 2^22), so bits 48..63 can hold y */
#define KEY_MASK ((1ULL << KEY_BITS) - 1)
#define EMPTY UINT64_MAX              /* no K (< 2^38) nor P (< 2^58) equals this */
#define PAIR_MULTIPLIER 1000003ULL
#define BLOCK 256
#define MIN_POSITIONS_PER_THREAD 4096

static const uint64_t COEFFS[32] = {
    36313,   27191,   51647,   81929,   131071,  196613,  262147,  393241,  524309,  655373,  786433,
    917521,  1048583, 1179653, 1310729, 1441801, 1572869, 1703941, 1835017, 1966087, 2097169, 2228243,
    2359319, 2490389, 2621471, 2752549, 2883617, 3014687, 3145757, 3276833, 3407903, 3538973};

int32_t ngram_abi_version(void) { return NGRAM_ABI_VERSION; }

/* murmur3 finalizer: spreads the low-entropy XOR keys over partitions and slots */
static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

typedef struct {
    const uint16_t *y;
    int64_t n_targets, first, n_pos; /* positions first .. n_targets-1, n_pos of them */
    int context_length, n_threads, part_bits;
    uint64_t pair_coeff;
    int64_t n_parts;
    uint64_t *keys;      /* [n_pos] pair keys, then packed (K | y << 48), then packed results */
    uint32_t *counts;    /* [n_pos] v in pair-partition order */
    uint32_t *ctx_v;     /* [n_pos] v in context-partition order */
    int64_t *pair_base;  /* [n_threads * n_parts] each thread's first write slot per pair partition */
    int64_t *ctx_base;
    int64_t *pair_cursor; /* working copies of the above, advanced by the scatter/gather phases */
    int64_t *ctx_cursor;
    int64_t *pair_start; /* [n_parts + 1] first entry of each partition */
    int64_t *ctx_start;
    int64_t next_part;   /* work counter of the partition phases (atomic) */
    int failed;          /* set (atomic) when a thread's table allocation fails */
    int64_t table_bytes;      /* this phase: sum over threads of their largest table (atomic add) */
    int64_t peak_table_bytes; /* largest table_bytes over the two partition phases */
    uint16_t *out_top;
    float *out_conf;
} Job;

typedef struct { uint64_t key; uint32_t a, b; } Entry; /* pair: a = count; context: key | t<<48, a = n, b = c */

typedef struct { Entry *slots; uint64_t cap, used, buf_cap; } Table;

static inline int64_t partition_of(const Job *job, uint64_t hash) {
    return job->part_bits ? (int64_t)(hash >> (64 - job->part_bits)) : 0;
}

/* context keys of positions first+p0 .. first+p0+len-1 (len <= BLOCK) */
static void context_keys(const Job *job, int64_t p0, int64_t len, uint64_t *out) {
    const uint16_t *y = job->y;
    int L = job->context_length;
    int64_t b = 0;
    if (p0 == 0) { /* target L-1: context (y0, y0, y1, .., y[L-2]) because the history is seeded with y0 */
        uint64_t k = (uint64_t)y[0] * COEFFS[0];
        for (int j = 1; j < L; j++) k ^= (uint64_t)y[j - 1] * COEFFS[j];
        out[0] = k;
        b = 1;
    }
    int64_t s0 = job->first + p0 - L; /* context of position i is y[i-L .. i-1] */
    for (int64_t q = b; q < len; q++) out[q] = 0;
    for (int j = 0; j < L; j++) {
        uint64_t cj = COEFFS[j];
        for (int64_t q = b; q < len; q++) out[q] ^= (uint64_t)y[s0 + q + j] * cj;
    }
}

static inline uint64_t pair_key(const Job *job, uint64_t k, uint16_t target) {
    return (k * PAIR_MULTIPLIER) ^ ((uint64_t)target * job->pair_coeff);
}

static void chunk_of(const Job *job, int tid, int64_t *lo, int64_t *hi) {
    *lo = job->n_pos * tid / job->n_threads;
    *hi = job->n_pos * (tid + 1) / job->n_threads;
}

/* ---- tables (one per thread, reused across partitions, grown on demand) ---- */

static int table_reset(Table *t, uint64_t want) {
    if (want > t->buf_cap) {
        free(t->slots);
        t->slots = malloc(want * sizeof(Entry));
        t->buf_cap = t->slots ? want : 0;
        if (!t->slots) return -1;
    }
    t->cap = want;
    t->used = 0;
    memset(t->slots, 0xff, want * sizeof(Entry));
    return 0;
}

static int table_grow(Table *t, uint64_t key_mask) {
    uint64_t new_cap = t->cap * 2;
    Entry *fresh = malloc(new_cap * sizeof(Entry));
    if (!fresh) return -1;
    memset(fresh, 0xff, new_cap * sizeof(Entry));
    for (uint64_t s = 0; s < t->cap; s++) {
        if (t->slots[s].key == EMPTY) continue;
        uint64_t slot = mix64(t->slots[s].key & key_mask) & (new_cap - 1);
        while (fresh[slot].key != EMPTY) slot = (slot + 1) & (new_cap - 1);
        fresh[slot] = t->slots[s];
    }
    free(t->slots);
    t->slots = fresh;
    t->cap = t->buf_cap = new_cap;
    return 0;
}

static uint64_t initial_capacity(int64_t entries) {
    uint64_t cap = 16;
    while (cap < (uint64_t)entries * 2 && cap < (1ULL << 16)) cap <<= 1;
    return cap;
}

/* ---- phases ---- */

static void phase_histograms(Job *job, int tid) {
    int64_t lo, hi;
    uint64_t k[BLOCK];
    int64_t *ph = job->pair_cursor + (int64_t)tid * job->n_parts;
    int64_t *ch = job->ctx_cursor + (int64_t)tid * job->n_parts;
    chunk_of(job, tid, &lo, &hi);
    for (int64_t p0 = lo; p0 < hi; p0 += BLOCK) {
        int64_t len = hi - p0 < BLOCK ? hi - p0 : BLOCK;
        context_keys(job, p0, len, k);
        for (int64_t q = 0; q < len; q++) {
            ch[partition_of(job, mix64(k[q]))]++;
            ph[partition_of(job, mix64(pair_key(job, k[q], job->y[job->first + p0 + q])))]++;
        }
    }
}

static void phase_scatter_pairs(Job *job, int tid) {
    int64_t lo, hi;
    uint64_t k[BLOCK];
    int64_t *off = job->pair_cursor + (int64_t)tid * job->n_parts;
    chunk_of(job, tid, &lo, &hi);
    for (int64_t p0 = lo; p0 < hi; p0 += BLOCK) {
        int64_t len = hi - p0 < BLOCK ? hi - p0 : BLOCK;
        context_keys(job, p0, len, k);
        for (int64_t q = 0; q < len; q++) {
            uint64_t pk = pair_key(job, k[q], job->y[job->first + p0 + q]);
            job->keys[off[partition_of(job, mix64(pk))]++] = pk;
        }
    }
}

static void count_pairs(Job *job, Table *t, int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; e++) {
        uint64_t key = job->keys[e], slot = mix64(key) & (t->cap - 1);
        while (t->slots[slot].key != key && t->slots[slot].key != EMPTY) slot = (slot + 1) & (t->cap - 1);
        if (t->slots[slot].key == EMPTY) {
            if ((t->used + 1) * 2 > t->cap) {
                if (table_grow(t, UINT64_MAX)) { __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED); return; }
                e--; /* redo this entry in the grown table */
                continue;
            }
            t->slots[slot].key = key;
            t->slots[slot].a = 0;
            t->used++;
        }
        job->counts[e] = ++t->slots[slot].a;
    }
}

static void phase_scatter_contexts(Job *job, int tid) {
    int64_t lo, hi;
    uint64_t k[BLOCK];
    int64_t *pair_off = job->pair_cursor + (int64_t)tid * job->n_parts;
    int64_t *ctx_off = job->ctx_cursor + (int64_t)tid * job->n_parts;
    chunk_of(job, tid, &lo, &hi);
    for (int64_t p0 = lo; p0 < hi; p0 += BLOCK) {
        int64_t len = hi - p0 < BLOCK ? hi - p0 : BLOCK;
        context_keys(job, p0, len, k);
        for (int64_t q = 0; q < len; q++) {
            uint16_t target = job->y[job->first + p0 + q];
            uint64_t pk = pair_key(job, k[q], target);
            uint32_t v = job->counts[pair_off[partition_of(job, mix64(pk))]++];
            int64_t dst = ctx_off[partition_of(job, mix64(k[q]))]++;
            job->keys[dst] = k[q] | ((uint64_t)target << KEY_BITS);
            job->ctx_v[dst] = v;
        }
    }
}

/* spec 05 section 3.4 for the entries of one context partition, in stream order */
static void step_contexts(Job *job, Table *t, int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; e++) {
        uint64_t packed = job->keys[e], key = packed & KEY_MASK, slot = mix64(key) & (t->cap - 1);
        uint32_t target = (uint32_t)(packed >> KEY_BITS), v = job->ctx_v[e];
        while ((t->slots[slot].key & KEY_MASK) != key && t->slots[slot].key != EMPTY)
            slot = (slot + 1) & (t->cap - 1);
        Entry *s = &t->slots[slot];
        uint64_t result = 0;
        if (s->key == EMPTY) {
            if ((t->used + 1) * 2 > t->cap) {
                if (table_grow(t, KEY_MASK)) { __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED); return; }
                e--;
                continue;
            }
            s->key = key | ((uint64_t)target << KEY_BITS);
            s->a = 1;
            s->b = v;
            t->used++;
        } else {
            float conf = (float)s->b / (float)s->a;
            uint32_t bits;
            memcpy(&bits, &conf, sizeof bits);
            result = (s->key >> KEY_BITS) | ((uint64_t)bits << 32);
            s->a++;
            if (v > s->b) {
                s->b = v;
                s->key = key | ((uint64_t)target << KEY_BITS);
            }
        }
        job->keys[e] = result;
    }
}

static void run_partitions(Job *job, const int64_t *start, int contexts) {
    Table t = {0};
    for (;;) {
        int64_t p = __atomic_fetch_add(&job->next_part, 1, __ATOMIC_RELAXED);
        if (p >= job->n_parts || __atomic_load_n(&job->failed, __ATOMIC_RELAXED)) break;
        if (start[p + 1] == start[p]) continue;
        if (table_reset(&t, initial_capacity(start[p + 1] - start[p]))) {
            __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
            break;
        }
        if (contexts) step_contexts(job, &t, start[p], start[p + 1]);
        else count_pairs(job, &t, start[p], start[p + 1]);
    }
    __atomic_fetch_add(&job->table_bytes, (int64_t)(t.buf_cap * sizeof(Entry)), __ATOMIC_RELAXED);
    free(t.slots);
}

static void phase_count_pairs(Job *job, int tid) { (void)tid; run_partitions(job, job->pair_start, 0); }
static void phase_step_contexts(Job *job, int tid) { (void)tid; run_partitions(job, job->ctx_start, 1); }


static void phase_gather(Job *job, int tid) {
    int64_t lo, hi;
    uint64_t k[BLOCK];
    int64_t *off = job->ctx_cursor + (int64_t)tid * job->n_parts;
    chunk_of(job, tid, &lo, &hi);
    for (int64_t p0 = lo; p0 < hi; p0 += BLOCK) {
        int64_t len = hi - p0 < BLOCK ? hi - p0 : BLOCK;
        context_keys(job, p0, len, k);
        for (int64_t q = 0; q < len; q++) {
            uint64_t r = job->keys[off[partition_of(job, mix64(k[q]))]++];
            uint32_t bits = (uint32_t)(r >> 32);
            float conf;
            memcpy(&conf, &bits, sizeof conf);
            job->out_top[job->first + p0 + q] = (uint16_t)(r & 0xffff);
            job->out_conf[job->first + p0 + q] = conf;
        }
    }
}

/* ---- driver ---- */

typedef void (*PhaseFn)(Job *, int);
typedef struct { Job *job; PhaseFn fn; int tid; } ThreadArg;

static void *thread_main(void *arg) {
    ThreadArg *a = arg;
    a->fn(a->job, a->tid);
    return NULL;
}

/* runs fn for every tid; a tid whose thread cannot be created runs on the caller (same result) */
static void run_phase(Job *job, PhaseFn fn) {
    pthread_t threads[MAX_THREADS];
    ThreadArg args[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int tid = 1; tid < job->n_threads; tid++) {
        args[tid] = (ThreadArg){job, fn, tid};
        started[tid] = pthread_create(&threads[tid], NULL, thread_main, &args[tid]) == 0;
    }
    fn(job, 0);
    for (int tid = 1; tid < job->n_threads; tid++) {
        if (started[tid]) pthread_join(threads[tid], NULL);
        else fn(job, tid);
    }
}

static void run_partition_phase(Job *job, PhaseFn fn) {
    job->next_part = 0;
    job->table_bytes = 0;
    run_phase(job, fn);
    if (job->table_bytes > job->peak_table_bytes) job->peak_table_bytes = job->table_bytes;
}

/* per-thread counts -> each thread's first write slot per partition (partition-major, thread-minor,
 * so every partition keeps stream order: a stable counting sort) */
static void counts_to_offsets(const Job *job, const int64_t *counts, int64_t *offsets, int64_t *start) {
    int64_t total = 0;
    for (int64_t p = 0; p < job->n_parts; p++) {
        start[p] = total;
        for (int tid = 0; tid < job->n_threads; tid++) {
            int64_t i = (int64_t)tid * job->n_parts + p;
            offsets[i] = total;
            total += counts[i];
        }
    }
    start[job->n_parts] = total;
}

static int choose_partition_bits(int64_t n_pos) {
    int bits = 0;
    while (bits < MAX_PARTITION_BITS && (n_pos >> bits) > TARGET_PARTITION_ENTRIES) bits++;
    return bits;
}

static void run_all_phases(Job *job) {
    size_t hist_bytes = (size_t)job->n_threads * job->n_parts * sizeof(int64_t);
    run_phase(job, phase_histograms);
    counts_to_offsets(job, job->pair_cursor, job->pair_base, job->pair_start);
    counts_to_offsets(job, job->ctx_cursor, job->ctx_base, job->ctx_start);
    memcpy(job->pair_cursor, job->pair_base, hist_bytes);
    run_phase(job, phase_scatter_pairs);
    run_partition_phase(job, phase_count_pairs);
    if (job->failed) return;
    memcpy(job->pair_cursor, job->pair_base, hist_bytes);
    memcpy(job->ctx_cursor, job->ctx_base, hist_bytes);
    run_phase(job, phase_scatter_contexts);
    run_partition_phase(job, phase_step_contexts);
    if (job->failed) return;
    memcpy(job->ctx_cursor, job->ctx_base, hist_bytes);
    run_phase(job, phase_gather);
}

static void free_job(Job *job) {
    free(job->keys);
    free(job->counts);
    free(job->ctx_v);
    free(job->pair_base);
    free(job->ctx_base);
    free(job->pair_cursor);
    free(job->ctx_cursor);
    free(job->pair_start);
    free(job->ctx_start);
}

int32_t ngram_token_channel(const uint16_t *targets, int64_t n_targets, int32_t context_length,
                            int32_t n_threads, uint16_t *out_top, float *out_conf, int64_t *out_work_bytes) {
    if (n_targets < 0 || context_length < 1 || context_length > 32 || n_threads < 1) return -1;
    if (n_targets > 0 && (!targets || !out_top || !out_conf)) return -1;
    if (out_work_bytes) *out_work_bytes = 0;
    for (int64_t i = 0; i < n_targets && i < context_length - 1; i++) { /* no context yet */
        out_top[i] = 0;
        out_conf[i] = 0.0f;
    }
    Job job = {0};
    job.y = targets;
    job.first = context_length - 1;
    job.n_pos = n_targets - job.first;
    if (job.n_pos <= 0) return 0;
    job.context_length = context_length;
    job.pair_coeff = COEFFS[context_length % 32];
    job.part_bits = choose_partition_bits(job.n_pos);
    job.n_parts = (int64_t)1 << job.part_bits;
    job.n_threads = n_threads > MAX_THREADS ? MAX_THREADS : n_threads;
    if (job.n_pos / MIN_POSITIONS_PER_THREAD + 1 < job.n_threads)
        job.n_threads = (int)(job.n_pos / MIN_POSITIONS_PER_THREAD) + 1;
    job.out_top = out_top;
    job.out_conf = out_conf;

    size_t n_hist = (size_t)job.n_threads * job.n_parts;
    job.keys = malloc((size_t)job.n_pos * sizeof(uint64_t));
    job.counts = malloc((size_t)job.n_pos * sizeof(uint32_t));
    job.ctx_v = malloc((size_t)job.n_pos * sizeof(uint32_t));
    job.pair_base = malloc(n_hist * sizeof(int64_t));
    job.ctx_base = malloc(n_hist * sizeof(int64_t));
    job.pair_cursor = calloc(n_hist, sizeof(int64_t));
    job.ctx_cursor = calloc(n_hist, sizeof(int64_t));
    job.pair_start = malloc((size_t)(job.n_parts + 1) * sizeof(int64_t));
    job.ctx_start = malloc((size_t)(job.n_parts + 1) * sizeof(int64_t));
    int32_t rc = -2;
    if (job.keys && job.counts && job.ctx_v && job.pair_base && job.ctx_base && job.pair_cursor &&
        job.ctx_cursor && job.pair_start && job.ctx_start) {
        run_all_phases(&job);
        rc = job.failed ? -2 : 0;
    }
    if (out_work_bytes)
        *out_work_bytes = (int64_t)((size_t)job.n_pos * (sizeof(uint64_t) + 2 * sizeof(uint32_t)) +
                                    4 * n_hist * sizeof(int64_t) + job.peak_table_bytes);
    free_job(&job);
    return rc;
}
