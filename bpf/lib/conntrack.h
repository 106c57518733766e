/* Connection tracking per endpoint and direction.
 *
 * A connection is tracked under both its directions from its first allowed packet on, so
 * every later packet takes one lookup. The reply direction passes without policy; the
 * forward direction passes while the endpoint's generation is the one the connection was
 * judged at, and is judged again (as Cilium judges every non-reply packet) once policy or
 * the ipcache changed. Service NAT lives in the entries too. */
#ifndef MESHAGENT_CONNTRACK_H
#define MESHAGENT_CONNTRACK_H

#include "lib/maps.h"

static __always_inline void ct_fill_key(struct ct_key *key, u32 endpoint_id, u8 direction,
                                        struct flow *f)
{
    key->saddr = f->saddr;
    key->daddr = f->daddr;
    key->sport = f->sport;
    key->dport = f->dport;
    key->protocol = f->protocol;
    key->direction = direction;
    key->pad = 0;
    key->endpoint_id = endpoint_id;
}

/* The live entry for this packet's tuple, or 0. Refreshes last-seen at most once a second:
 * a write per packet would dirty the entry's cache line on every packet. */
static __always_inline struct ct_value *ct_lookup(struct ct_key *key, u64 now)
{
    int tcp = key->protocol == IPPROTO_TCP;
    u64 lifetime = tcp ? CT_LIFETIME_TCP_NS : CT_LIFETIME_ANY_NS;
    struct ct_value *value = tcp ? ct_tcp.lookup(key) : ct_any.lookup(key);
    if (!value)
        return 0;
    if (now - value->last_seen_ns > lifetime) {  /* expired */
        if (tcp)
            ct_tcp.delete(key);
        else
            ct_any.delete(key);
        return 0;
    }
    if (now - value->last_seen_ns > 1000000000ULL)
        value->last_seen_ns = now;
    return value;
}

static __always_inline void ct_put(struct ct_key *key, struct ct_value *value)
{
    if (key->protocol == IPPROTO_TCP)
        ct_tcp.update(key, value);
    else
        ct_any.update(key, value);
}

/* Track an allowed connection. ``orig`` is the packet as it reached the hook, ``f`` as it
 * leaves (after a service DNAT, if any): the forward entry is keyed by the first, the reply
 * entry by the reverse of the second, and undoes the DNAT. */
static __always_inline void ct_create(u32 endpoint_id, u8 direction, struct flow *orig,
                                      struct flow *f, u32 generation, u64 now)
{
    struct ct_key key = {};
    struct ct_value value = {.last_seen_ns = now, .generation = generation};
    int nat = orig->daddr != f->daddr || orig->dport != f->dport;
    ct_fill_key(&key, endpoint_id, direction, orig);
    if (nat) {
        value.flags = CT_NAT_DST;
        value.nat_ip = f->daddr;
        value.nat_port = f->dport;
    }
    ct_put(&key, &value);
    key.saddr = f->daddr;
    key.daddr = f->saddr;
    key.sport = f->dport;
    key.dport = f->sport;
    key.direction = direction ^ 1;
    value.flags = CT_REPLY;
    value.nat_ip = 0;
    value.nat_port = 0;
    if (nat) {
        value.flags |= CT_NAT_SRC;
        value.nat_ip = orig->daddr;
        value.nat_port = orig->dport;
    }
    ct_put(&key, &value);
}

#endif
