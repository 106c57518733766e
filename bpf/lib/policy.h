/* Policy lookup: two longest-prefix lookups, the peer's identity and any identity.
 *
 * Userspace (plugins/ebpf/policymap.py) writes each (endpoint, direction, identity) group so
 * that its longest matching prefix carries the verdict of every rule covering the packet, deny
 * beating redirect beating allow; across the two lookups a deny wins, then a redirect (Cilium's
 * proxy-port priority: a DNS rule for any peer redirects where an L3 allow covers the peer),
 * then an allow, else the default deny. Each
 * entry carries its own prefix length, which picks the entry that flow events name as Cilium
 * 1.17+ does (bpf/lib/policy.h there): of two allows, any identity's only when it is longer. */
#ifndef MESHAGENT_POLICY_H
#define MESHAGENT_POLICY_H

#include "lib/maps.h"

/* The entry of one identity's group (0: any peer) for this packet, or 0. */
static __always_inline struct policy_value *policy_lookup(u32 endpoint_id, u8 direction,
                                                          u32 identity, u8 protocol, u16 port)
{
    struct policy_key key = {.prefixlen = POLICY_PREFIX_FULL, .endpoint_id = endpoint_id,
                             .identity = identity, .direction = direction,
                             .protocol = protocol, .port = htons(port)};
    return policy.lookup(&key);
}

/* The match type of an entry of the peer's identity (``peer``) or of any identity. */
static __always_inline u8 policy_match(struct policy_value *entry, int peer)
{
    if (peer)
        return entry->prefix > 8 ? MATCH_L3_L4 : entry->prefix ? MATCH_L3_PROTO : MATCH_L3_ONLY;
    return entry->prefix == 0 ? MATCH_ALL : entry->prefix <= 8 ? MATCH_PROTO_ONLY : MATCH_L4_ONLY;
}

/* REASON_FORWARDED, REASON_POLICY_DENY or REASON_POLICY_DEFAULT; ``match`` is the deciding
 * entry's match type (a deny of the peer's identity, then one of any identity, then a
 * redirect of each in that order; of two allows the peer's unless any identity's prefix is
 * longer; MATCH_NONE for a default drop); ``redirect`` is set when a redirect decided. */
static __always_inline int policy_check(u32 endpoint_id, u8 direction, u32 identity,
                                        u8 protocol, u16 port, u8 *match, u8 *redirect)
{
    struct policy_value *specific = identity ? policy_lookup(endpoint_id, direction, identity,
                                                             protocol, port) : 0;
    struct policy_value *any = policy_lookup(endpoint_id, direction, 0, protocol, port);
    *match = MATCH_NONE;
    if (specific && specific->verdict == VERDICT_DENY) {
        *match = policy_match(specific, 1);
        return REASON_POLICY_DENY;
    }
    if (any && any->verdict == VERDICT_DENY) {
        *match = policy_match(any, 0);
        return REASON_POLICY_DENY;
    }
    if (specific && specific->verdict == VERDICT_REDIRECT) {
        *match = policy_match(specific, 1);
        *redirect = 1;
        return REASON_FORWARDED;
    }
    if (any && any->verdict == VERDICT_REDIRECT) {
        *match = policy_match(any, 0);
        *redirect = 1;
        return REASON_FORWARDED;
    }
    if (specific && (!any || any->prefix <= specific->prefix)) {
        *match = policy_match(specific, 1);
        return REASON_FORWARDED;
    }
    if (any) {
        *match = policy_match(any, 0);
        return REASON_FORWARDED;
    }
    return REASON_POLICY_DEFAULT;
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
