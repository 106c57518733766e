/* Policy lookup: two longest-prefix lookups, the peer's identity and any identity.
 *
 * Userspace (plugins/ebpf/policymap.py) writes each (endpoint, direction, identity) group so
 * that its longest matching prefix carries the verdict of every rule covering the packet, deny
 * beating allow; across the two lookups a deny wins, then an allow, else the default deny. */
#ifndef MESHAGENT_POLICY_H
#define MESHAGENT_POLICY_H

#include "lib/maps.h"

static __always_inline u8 policy_lookup(u32 endpoint_id, u8 direction, u32 identity,
                                        u8 protocol, u16 port)
{
    struct policy_key key = {.prefixlen = POLICY_PREFIX_FULL, .endpoint_id = endpoint_id,
                             .identity = identity, .direction = direction,
                             .protocol = protocol, .port = htons(port)};
    struct policy_value *value = policy.lookup(&key);
    return value ? value->verdict : 0;
}

static __always_inline int policy_check(u32 endpoint_id, u8 direction, u32 identity,
                                        u8 protocol, u16 port)
{
    u8 specific = identity ? policy_lookup(endpoint_id, direction, identity, protocol, port) : 0;
    if (specific == VERDICT_DENY)
        return REASON_POLICY_DENY;
    u8 any = policy_lookup(endpoint_id, direction, 0, protocol, port);
    if (any == VERDICT_DENY)
        return REASON_POLICY_DENY;
    return specific == VERDICT_ALLOW || any == VERDICT_ALLOW ? REASON_FORWARDED
                                                             : REASON_POLICY_DEFAULT;
}

static __always_inline u32 ipcache_identity(u32 ip)
{
    struct ipcache_key key = {.prefixlen = 32, .ip = ip};
    struct ipcache_value *value = ipcache.lookup(&key);
    return value ? value->identity : IDENTITY_WORLD;
}

static __always_inline u32 ipcache6_identity(u32 *ip)
{
    struct ipcache6_key key = {.prefixlen = 128};
    __builtin_memcpy(key.ip, ip, 16);
    struct ipcache_value *value = ipcache6.lookup(&key);
    return value ? value->identity : IDENTITY_WORLD_IPV6;
}

#endif
