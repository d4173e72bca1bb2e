/*
 * fm_inject.c - fault injection for tests: a per-site count of calls that
 * fail with a given errno instead of doing the syscall. Depends on nothing
 * else of the core, so any file may ask fm__injected.
 */
#include "fm_internal.h"

#include <stdatomic.h>

static _Atomic int32_t inject_err[FM_SITE_COUNT];
static _Atomic uint32_t inject_count[FM_SITE_COUNT];

void fm_inject(uint32_t site, int32_t err, uint32_t count)
{
    if (site == 0 || site >= FM_SITE_COUNT)
        return;
    atomic_store(&inject_count[site], 0);
    atomic_store(&inject_err[site], err);
    atomic_store(&inject_count[site], count);
}

int32_t fm__injected(uint32_t site)
{
    uint32_t c = atomic_load_explicit(&inject_count[site], memory_order_relaxed);
    while (c > 0) {
        if (atomic_compare_exchange_weak(&inject_count[site], &c, c - 1))
            return atomic_load(&inject_err[site]);
    }
    return 0;
}
