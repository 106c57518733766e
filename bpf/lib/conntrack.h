/* Connection tracking per endpoint and direction: replies of allowed connections pass. */
#ifndef MESHAGENT_CONNTRACK_H
#define MESHAGENT_CONNTRACK_H

#include "lib/maps.h"

static __always_inline struct ct_value *ct_find(struct ct_key *key, u64 now, u64 lifetime)
{
    struct ct_value *value = key->protocol == IPPROTO_TCP ? ct_tcp.lookup(key)
                                                          : ct_any.lookup(key);
    if (!value)
        return 0;
    if (now - value->last_seen_ns > lifetime) {  /* expired */
        if (key->protocol == IPPROTO_TCP)
            ct_tcp.delete(key);
        else
            ct_any.delete(key);
        return 0;
    }
    return value;
}

/* 1 if the packet belongs to a tracked connection, else 0: one lookup, since a connection
 * is tracked under both its directions from its first packet on. */
static __always_inline int ct_lookup(u32 endpoint_id, u8 direction, struct flow *f, u64 now)
{
    u64 lifetime = f->protocol == IPPROTO_TCP ? CT_LIFETIME_TCP_NS : CT_LIFETIME_ANY_NS;
    struct ct_key key = {.saddr = f->saddr, .daddr = f->daddr, .sport = f->sport,
                         .dport = f->dport, .protocol = f->protocol, .direction = direction,
                         .endpoint_id = endpoint_id};
    struct ct_value *value = ct_find(&key, now, lifetime);
    if (!value)
        return 0;
    /* refresh at most once a second: a write per packet would dirty the entry's cache line
     * on every packet, and second-granularity is plenty for expiry */
    if (now - value->last_seen_ns > 1000000000ULL)
        value->last_seen_ns = now;
    return 1;
}

static __always_inline void ct_put(struct ct_key *key, struct ct_value *value)
{
    if (key->protocol == IPPROTO_TCP)
        ct_tcp.update(key, value);
    else
        ct_any.update(key, value);
}

/* Track an allowed connection: its packets this way, and its replies coming back. */
static __always_inline void ct_create(u32 endpoint_id, u8 direction, struct flow *f, u64 now)
{
    struct ct_key key = {.saddr = f->saddr, .daddr = f->daddr, .sport = f->sport,
                         .dport = f->dport, .protocol = f->protocol, .direction = direction,
                         .endpoint_id = endpoint_id};
    struct ct_value value = {.last_seen_ns = now, .packets = 1};
    ct_put(&key, &value);
    key.saddr = f->daddr;
    key.daddr = f->saddr;
    key.sport = f->dport;
    key.dport = f->sport;
    key.direction = direction ^ 1;
    value.packets = 0;
    ct_put(&key, &value);
}

#endif
