/* XXH64 (Yann Collet, xxHash specification, doc/xxhash_spec.md), seedable, for stable keys.
 * Seedless use (seed 0) gives the same answer in every process and on every machine, unlike
 * Python's salted hash(). Checked in tests against the published vectors and python-xxhash. */
#ifndef FASTLB_XXH64_H
#define FASTLB_XXH64_H
#include <stdint.h>
#include <string.h>

#define FLB_P1 0x9E3779B185EBCA87ULL
#define FLB_P2 0xC2B2AE3D27D4EB4FULL
#define FLB_P3 0x165667B19E3779F9ULL
#define FLB_P4 0x85EBCA77C2B2AE63ULL
#define FLB_P5 0x27D4EB2F165667C5ULL

static inline uint64_t flb_rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t flb_rd64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; } /* little-endian hosts */
static inline uint32_t flb_rd32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t flb_round(uint64_t acc, uint64_t in) { acc += in * FLB_P2; acc = flb_rotl64(acc, 31); return acc * FLB_P1; }
static inline uint64_t flb_merge(uint64_t acc, uint64_t v) { acc ^= flb_round(0, v); return acc * FLB_P1 + FLB_P4; }

static inline uint64_t flb_xxh64(const void *data, size_t len, uint64_t seed) {
    const unsigned char *p = (const unsigned char *)data, *end = p + len;
    uint64_t h;
    if (len >= 32) {
        uint64_t v1 = seed + FLB_P1 + FLB_P2, v2 = seed + FLB_P2, v3 = seed, v4 = seed - FLB_P1;
        const unsigned char *limit = end - 32;
        do {
            v1 = flb_round(v1, flb_rd64(p)); v2 = flb_round(v2, flb_rd64(p + 8));
            v3 = flb_round(v3, flb_rd64(p + 16)); v4 = flb_round(v4, flb_rd64(p + 24));
            p += 32;
        } while (p <= limit);
        h = flb_rotl64(v1, 1) + flb_rotl64(v2, 7) + flb_rotl64(v3, 12) + flb_rotl64(v4, 18);
        h = flb_merge(h, v1); h = flb_merge(h, v2); h = flb_merge(h, v3); h = flb_merge(h, v4);
    } else {
        h = seed + FLB_P5;
    }
    h += (uint64_t)len;
    while (p + 8 <= end) { h ^= flb_round(0, flb_rd64(p)); h = flb_rotl64(h, 27) * FLB_P1 + FLB_P4; p += 8; }
    if (p + 4 <= end) { h ^= (uint64_t)flb_rd32(p) * FLB_P1; h = flb_rotl64(h, 23) * FLB_P2 + FLB_P3; p += 4; }
    while (p < end) { h ^= (*p) * FLB_P5; h = flb_rotl64(h, 11) * FLB_P1; p++; }
    h ^= h >> 33; h *= FLB_P2; h ^= h >> 29; h *= FLB_P3; h ^= h >> 32;
    return h;
}
#endif
