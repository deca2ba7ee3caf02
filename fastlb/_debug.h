/* Resource counts of the debug build (uvloop's DEBUG handle counts, for the engine).
 *
 * Owner: the Cython core. With FASTLB_DEBUG_COUNTS defined (setup.py defines it when
 * FASTLB_DEBUG=1) the engine counts, process-wide, what it holds: live Session objects, data
 * buffers malloc'ed and not yet freed (in a session or in an engine's pool), buffers held by
 * sessions, and file descriptors it opened (epoll, accepted clients, backend sockets) and has
 * not closed yet. Engine.close() checks that they are back to zero and debug_counts() shows
 * them. In a normal build every call below is an empty inline function: no field, no
 * instruction on the data path.
 *
 * Also debug-only: flb_dbg_fail_epoll, a count of coming epoll_ctl calls on sessions to fail
 * with ENOMEM, so a test can drive the engine's epoll_ctl failure path for real.
 */
#ifndef FASTLB_DEBUG_H
#define FASTLB_DEBUG_H

enum { FLB_DBG_SESSIONS, FLB_DBG_BUFFERS, FLB_DBG_BUFFERS_IN_USE, FLB_DBG_FDS, FLB_DBG_ENGINES,
       FLB_DBG_N };

#ifdef FASTLB_DEBUG_COUNTS
#define FLB_DEBUG_COUNTS 1
static long flb_dbg_counts[FLB_DBG_N];
static long flb_dbg_fail_epoll_n;
static inline void flb_dbg_add(int what, long delta) { flb_dbg_counts[what] += delta; }
static inline long flb_dbg_get(int what) { return flb_dbg_counts[what]; }
static inline void flb_dbg_fail_epoll(long n) { flb_dbg_fail_epoll_n = n; }
/* 1 when this epoll_ctl must fail (and consumes one), else 0. */
static inline int flb_dbg_epoll_should_fail(void) {
    if (flb_dbg_fail_epoll_n > 0) { flb_dbg_fail_epoll_n--; return 1; }
    return 0;
}
#else
#define FLB_DEBUG_COUNTS 0
static inline void flb_dbg_add(int what, long delta) { (void)what; (void)delta; }
static inline long flb_dbg_get(int what) { (void)what; return 0; }
static inline void flb_dbg_fail_epoll(long n) { (void)n; }
static inline int flb_dbg_epoll_should_fail(void) { return 0; }
#endif

#endif
