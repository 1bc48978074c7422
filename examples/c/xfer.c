/*
 * Two processes move KV blocks through pdx's C API (libpdx, include/pdx.h), as a prefill and a decode engine would.
 *
 *   xfer target DIR      registers engine-owned memory (an mmap it keeps), publishes its metadata in DIR/target.md
 *                        and where its blocks are in DIR/target.info, then waits for the initiator's notifications
 *                        and checks every byte the initiator wrote into it.
 *   xfer initiator DIR   loads the target's metadata (from DIR/target.md, or over the target's listener with
 *                        PDX_XFER_FETCH=1), READs the target's blocks in reverse order with a notification, checks
 *                        every byte, then WRITEs new blocks into the target's second half with a notification.
 *
 * PDX_XFER_TRANSPORTS (e.g. "tcp") restricts the initiator's transports. Exit status 0 only when every check passed.
 * examples/c/run.sh builds and runs both. SPDX-License-Identifier: Apache-2.0
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "pdx.h"

enum { BLOCK = 64 << 10, BLOCKS = 32 };
#define REGION ((size_t)BLOCK * BLOCKS)
#define TIMEOUT_US (20u * 1000 * 1000)

/* Exits with the status's name and pdx's message when a call fails. */
#define CHECK(call)                                                                                     \
    do {                                                                                                \
        pdx_status s_ = (call);                                                                         \
        if (s_ != PDX_OK && s_ != PDX_IN_PROGRESS) {                                                    \
            fprintf(stderr, "%s:%d: %s: %s (%s)\n", __FILE__, __LINE__, #call, pdx_status_str(s_),      \
                    pdx_last_error());                                                                  \
            exit(1);                                                                                    \
        }                                                                                               \
    } while (0)

static void die(const char *what) {
    fprintf(stderr, "%s: %s\n", what, errno ? strerror(errno) : "failed");
    exit(1);
}

/* The bytes of block `b` the target starts with, and those the initiator writes. */
static uint8_t read_pattern(size_t b, size_t i) { return (uint8_t)(b * 131 + i * 7 + (i >> 8)); }
static uint8_t write_pattern(size_t b, size_t i) { return (uint8_t)(0xa5 ^ (b * 17 + i * 3)); }

/* Engine-owned memory: pdx registers it by address and never frees it. */
static uint8_t *map_region(size_t len) {
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) die("mmap");
    return p;
}

static void write_file(const char *dir, const char *name, const void *data, size_t len) {
    char tmp[4096], path[4096];
    snprintf(tmp, sizeof tmp, "%s/%s.tmp", dir, name);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(tmp, "wb");
    if (!f || fwrite(data, 1, len, f) != len || fclose(f) != 0) die(tmp);
    /* Renamed into place, so the other process never reads half a file. */
    if (rename(tmp, path) != 0) die(path);
}

/* Reads DIR/NAME once it exists (polling for up to 20 s); returns a malloc'd, NUL-terminated buffer. */
static uint8_t *read_file(const char *dir, const char *name, size_t *len) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = NULL;
    for (int i = 0; i < 2000 && !(f = fopen(path, "rb")); i++) usleep(10000);
    if (!f) die(path);
    uint8_t *buf = malloc((1 << 20) + 1);
    if (!buf) die("malloc");
    *len = fread(buf, 1, 1 << 20, f);
    fclose(f);
    buf[*len] = 0;
    return buf;
}

static int target(const char *dir) {
    pdx_agent_config cfg = {0};
    cfg.name = "target";
    pdx_agent *agent;
    CHECK(pdx_agent_create(&cfg, &agent));

    /* First half: blocks the initiator READs; second half: where it WRITEs. */
    uint8_t *kv = map_region(2 * REGION);
    for (size_t b = 0; b < BLOCKS; b++)
        for (size_t i = 0; i < BLOCK; i++) kv[b * BLOCK + i] = read_pattern(b, i);
    /* Touch the second half too, as an engine's KV cache is: a peer's first WRITE then takes no page faults. */
    memset(kv + REGION, 0, REGION);
    pdx_mem *mem;
    CHECK(pdx_register_mem(agent, (uint64_t)(uintptr_t)kv, 2 * REGION, PDX_MEM_DRAM, 0, &mem));

    /* Metadata in a pdx-owned blob; where the blocks are, and the side channel's address, in a text file. */
    pdx_blob *md;
    const uint8_t *md_bytes;
    size_t md_len;
    CHECK(pdx_get_local_md_blob(agent, &md));
    CHECK(pdx_blob_data(md, &md_bytes, &md_len));
    char addr[64], info[256];
    CHECK(pdx_agent_listen_addr(agent, addr, sizeof addr));
    int n = snprintf(info, sizeof info, "%s %" PRIu64 "\n", addr, (uint64_t)(uintptr_t)kv);
    write_file(dir, "target.info", info, (size_t)n);
    write_file(dir, "target.md", md_bytes, md_len);
    CHECK(pdx_blob_destroy(md));
    printf("target: %zu bytes registered at %p, metadata %zu bytes, listening on %s\n", 2 * REGION, (void *)kv,
           md_len, addr);
    fflush(stdout);

    /* The initiator's notifications: "read-done" then "write-done", each after its bytes are in place. */
    const char *expected[2] = {"read-done", "write-done"};
    int got = 0;
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    while (got < 2) {
        pdx_notif_list *list;
        CHECK(pdx_wait_notifs(agent, 1000 * 1000, &list));
        size_t count;
        CHECK(pdx_notif_list_len(list, &count));
        for (size_t k = 0; k < count; k++) {
            const char *from;
            const uint8_t *msg;
            size_t len;
            CHECK(pdx_notif_list_get(list, k, &from, &msg, &len));
            if (got >= 2 || strcmp(from, "initiator") != 0 || len != strlen(expected[got]) ||
                memcmp(msg, expected[got], len) != 0) {
                fprintf(stderr, "target: unexpected notification from %s: %.*s\n", from, (int)len, msg);
                return 1;
            }
            printf("target: notification from %s: %.*s\n", from, (int)len, msg);
            got++;
        }
        CHECK(pdx_notif_list_destroy(list));
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (got < 2 && now.tv_sec - start.tv_sec > 20) {
            fprintf(stderr, "target: timed out with %d of 2 notifications\n", got);
            return 1;
        }
    }

    /* Every byte: the READ half untouched, the WRITE half as the initiator wrote it. */
    for (size_t b = 0; b < BLOCKS; b++)
        for (size_t i = 0; i < BLOCK; i++) {
            if (kv[b * BLOCK + i] != read_pattern(b, i)) {
                fprintf(stderr, "target: block %zu byte %zu changed\n", b, i);
                return 1;
            }
            if (kv[REGION + b * BLOCK + i] != write_pattern(b, i)) {
                fprintf(stderr, "target: written block %zu byte %zu is %u, expected %u\n", b, i,
                        kv[REGION + b * BLOCK + i], write_pattern(b, i));
                return 1;
            }
        }
    printf("target: OK, %d blocks of %d bytes written by the initiator, every byte checked\n", BLOCKS, BLOCK);

    /* Memory is the engine's again only after deregistration (retryable while a transfer lets go of it). */
    pdx_status s;
    for (int tries = 0; (s = pdx_deregister_mem(mem)) == PDX_ERR_REGION_IN_USE && tries < 1000; tries++)
        usleep(1000);
    CHECK(s);
    CHECK(pdx_agent_destroy(agent));
    munmap(kv, 2 * REGION);
    return 0;
}

static double seconds_since(const struct timespec *t0) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)(t.tv_sec - t0->tv_sec) + (double)(t.tv_nsec - t0->tv_nsec) / 1e9;
}

/* Posts and waits for completion; returns the seconds it took. */
static double run_xfer(pdx_xfer *x) {
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pdx_status s = pdx_post_xfer_req(x);
    CHECK(s);
    if (s == PDX_IN_PROGRESS) {
        s = pdx_wait_xfer_req(x, TIMEOUT_US);
        if (s == PDX_IN_PROGRESS) {
            fprintf(stderr, "initiator: transfer still in progress after %u us\n", TIMEOUT_US);
            exit(1);
        }
        CHECK(s);
    }
    return seconds_since(&t0);
}

static int initiator(const char *dir) {
    size_t info_len, md_len;
    char *info = (char *)read_file(dir, "target.info", &info_len);
    char addr[64];
    uint64_t remote_base;
    if (sscanf(info, "%63s %" SCNu64, addr, &remote_base) != 2) {
        fprintf(stderr, "initiator: malformed target.info: %s\n", info);
        return 1;
    }

    pdx_agent_config cfg = {0};
    cfg.name = "initiator";
    cfg.listen = "127.0.0.1:0"; /* so the target can notify back if it wants to */
    cfg.transports = getenv("PDX_XFER_TRANSPORTS");
    pdx_agent *agent;
    CHECK(pdx_agent_create(&cfg, &agent));

    char name[PDX_AGENT_NAME_BUF];
    const char *fetch = getenv("PDX_XFER_FETCH");
    if (fetch && strcmp(fetch, "1") == 0) {
        CHECK(pdx_fetch_remote_md(agent, addr, name, sizeof name));
        printf("initiator: fetched the metadata of `%s` from %s\n", name, addr);
    } else {
        uint8_t *md = read_file(dir, "target.md", &md_len);
        CHECK(pdx_load_remote_md(agent, md, md_len, name, sizeof name));
        printf("initiator: loaded %zu bytes of metadata of `%s`\n", md_len, name);
        free(md);
    }
    free(info);
    if (strcmp(name, "target") != 0) {
        fprintf(stderr, "initiator: the metadata names `%s`\n", name);
        return 1;
    }

    uint8_t *kv = map_region(REGION);
    pdx_mem *mem;
    CHECK(pdx_register_mem(agent, (uint64_t)(uintptr_t)kv, REGION, PDX_MEM_DRAM, 0, &mem));

    /* READ: prepared lists and indices (NIXL prepXferDlist + makeXferReq); our block i <- their block BLOCKS-1-i. */
    pdx_dlist *local, *remote;
    CHECK(pdx_dlist_create(PDX_MEM_DRAM, &local));
    CHECK(pdx_dlist_create(PDX_MEM_DRAM, &remote));
    size_t local_idx[BLOCKS], remote_idx[BLOCKS];
    for (size_t b = 0; b < BLOCKS; b++) {
        CHECK(pdx_dlist_add(local, (uint64_t)(uintptr_t)(kv + b * BLOCK), BLOCK, 0));
        CHECK(pdx_dlist_add(remote, remote_base + b * BLOCK, BLOCK, 0));
        local_idx[b] = b;
        remote_idx[b] = BLOCKS - 1 - b;
    }
    pdx_prepped *lp, *rp;
    CHECK(pdx_prep_xfer_dlist(agent, NULL, local, &lp));
    CHECK(pdx_prep_xfer_dlist(agent, "target", remote, &rp));
    pdx_xfer *rd;
    const char *read_done = "read-done";
    CHECK(pdx_make_xfer_req(agent, PDX_XFER_READ, lp, local_idx, rp, remote_idx, BLOCKS,
                            (const uint8_t *)read_done, strlen(read_done), &rd));
    const char *transport;
    CHECK(pdx_query_xfer_transport(rd, &transport));
    double t = run_xfer(rd);
    for (size_t b = 0; b < BLOCKS; b++)
        for (size_t i = 0; i < BLOCK; i++)
            if (kv[b * BLOCK + i] != read_pattern(BLOCKS - 1 - b, i)) {
                fprintf(stderr, "initiator: READ block %zu byte %zu is %u, expected %u\n", b, i, kv[b * BLOCK + i],
                        read_pattern(BLOCKS - 1 - b, i));
                return 1;
            }
    printf("initiator: READ %d x %d bytes over %s in %.3f ms, every byte checked\n", BLOCKS, BLOCK, transport,
           t * 1e3);
    CHECK(pdx_release_xfer_req(rd));
    CHECK(pdx_release_dlist_handle(lp));
    CHECK(pdx_release_dlist_handle(rp));
    CHECK(pdx_dlist_destroy(remote));

    /* WRITE: two descriptor lists paired in order (NIXL createXferReq), into the target's second half. */
    for (size_t b = 0; b < BLOCKS; b++)
        for (size_t i = 0; i < BLOCK; i++) kv[b * BLOCK + i] = write_pattern(b, i);
    CHECK(pdx_dlist_create(PDX_MEM_DRAM, &remote));
    for (size_t b = 0; b < BLOCKS; b++) CHECK(pdx_dlist_add(remote, remote_base + REGION + b * BLOCK, BLOCK, 0));
    pdx_xfer *wr;
    const char *write_done = "write-done";
    CHECK(pdx_create_xfer_req(agent, PDX_XFER_WRITE, local, "target", remote, (const uint8_t *)write_done,
                              strlen(write_done), &wr));
    t = run_xfer(wr);
    printf("initiator: WRITE %d x %d bytes in %.3f ms\n", BLOCKS, BLOCK, t * 1e3);
    CHECK(pdx_release_xfer_req(wr));
    CHECK(pdx_dlist_destroy(local));
    CHECK(pdx_dlist_destroy(remote));

    pdx_status s;
    for (int tries = 0; (s = pdx_deregister_mem(mem)) == PDX_ERR_REGION_IN_USE && tries < 1000; tries++)
        usleep(1000);
    CHECK(s);
    CHECK(pdx_agent_destroy(agent));
    munmap(kv, REGION);
    printf("initiator: OK\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "target") == 0) return target(argv[2]);
    if (argc == 3 && strcmp(argv[1], "initiator") == 0) return initiator(argv[2]);
    fprintf(stderr, "usage: %s target|initiator DIR (pdx %s)\n", argv[0], pdx_version());
    return 2;
}
