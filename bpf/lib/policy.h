/* Policy lookup: exact, then wildcards; a deny anywhere in the matching set wins. */
#ifndef MESHAGENT_POLICY_H
#define MESHAGENT_POLICY_H

#include "lib/maps.h"

static __always_inline int policy_check(u32 endpoint_id, u8 direction, u32 identity,
                                        u8 protocol, u16 port)
{
    struct policy_key key = {};
    int allowed = 0;
    u32 identities[2] = {identity, 0};
    u8 protocols[2] = {protocol, 0};
    u16 ports[2] = {port, 0};

    key.endpoint_id = endpoint_id;
    key.direction = direction;
#pragma unroll
    for (int i = 0; i < 2; i++) {
#pragma unroll
        for (int p = 0; p < 2; p++) {
#pragma unroll
            for (int q = 0; q < 2; q++) {
                key.identity = identities[i];
                key.protocol = protocols[p];
                key.port = ports[q];
                struct policy_value *value = policy.lookup(&key);
                if (!value)
                    continue;
                if (value->verdict == VERDICT_DENY)
                    return REASON_POLICY_DENY;
                allowed = 1;
            }
        }
    }
    return allowed ? REASON_FORWARDED : REASON_POLICY_DEFAULT;
}

static __always_inline u32 ipcache_identity(u32 ip)
{
    struct ipcache_key key = {.prefixlen = 32, .ip = ip};
    struct ipcache_value *value = ipcache.lookup(&key);
    return value ? value->identity : IDENTITY_WORLD;
}

#endif
