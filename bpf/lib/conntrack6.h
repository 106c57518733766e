/* Connection tracking of IPv6 flows: conntrack.h's rules, with 128-bit addresses in maps of
 * their own (ct6_tcp, ct6_any); the expiry rule is conntrack.h's. No service NAT: services
 * are IPv4 only. */
#ifndef MESHAGENT_CONNTRACK6_H
#define MESHAGENT_CONNTRACK6_H

#include "lib/conntrack.h"

static __always_inline void ct6_fill_key(struct ct6_key *key, u32 endpoint_id, u8 direction,
                                         struct flow *f, int reverse)
{
    __builtin_memcpy(key->saddr, reverse ? f->daddr6 : f->saddr6, 16);
    __builtin_memcpy(key->daddr, reverse ? f->saddr6 : f->daddr6, 16);
    key->sport = reverse ? f->dport : f->sport;
    key->dport = reverse ? f->sport : f->dport;
    key->protocol = f->protocol;
    key->direction = reverse ? direction ^ 1 : direction;
    key->pad = 0;
    key->endpoint_id = endpoint_id;
}

static __always_inline struct ct_value *ct6_get(struct ct6_key *key)
{
    return key->protocol == IPPROTO_TCP ? ct6_tcp.lookup(key) : ct6_any.lookup(key);
}

/* The live entry for this packet's tuple, or 0; refreshes both halves at most once a second. */
static __always_inline struct ct_value *ct6_lookup(struct endpoint_info *ep, u8 direction,
                                                   struct flow *f, u64 now)
{
    struct ct6_key key = {};
    ct6_fill_key(&key, ep->endpoint_id, direction, f, 0);
    struct ct_value *value = ct6_get(&key);
    if (!value)
        return 0;
    if (ct_expired(value, f->protocol, ep, now)) {
        if (f->protocol == IPPROTO_TCP)
            ct6_tcp.delete(&key);
        else
            ct6_any.delete(&key);
        return 0;
    }
    if (now - value->last_seen_ns > 1000000000ULL) {
        value->last_seen_ns = now;
        struct ct6_key other = {};
        ct6_fill_key(&other, ep->endpoint_id, direction, f, 1);
        struct ct_value *half = ct6_get(&other);
        if (half)
            half->last_seen_ns = now;
    }
    return value;
}

/* ct_note_close() for IPv6. */
static __always_inline void ct6_note_close(struct endpoint_info *ep, u8 direction,
                                           struct ct_value *value, struct flow *f, u64 now)
{
    u8 own = ct_close_bits(f->tcp_flags, 1);
    if (f->protocol != IPPROTO_TCP || !own || (value->closing & own) == own)
        return;
    value->closing |= own;
    value->last_seen_ns = now;
    struct ct6_key other = {};
    ct6_fill_key(&other, ep->endpoint_id, direction, f, 1);
    struct ct_value *half = ct6_tcp.lookup(&other);
    if (half) {
        half->closing |= ct_close_bits(f->tcp_flags, 0);
        half->last_seen_ns = now;
    }
}

/* ct_forget() for IPv6. */
static __always_inline void ct6_forget(struct endpoint_info *ep, u8 direction, struct flow *f)
{
    struct ct6_key key = {};
    ct6_fill_key(&key, ep->endpoint_id, direction, f, 1);
    ct6_tcp.delete(&key);
    ct6_fill_key(&key, ep->endpoint_id, direction, f, 0);
    ct6_tcp.delete(&key);
}

static __always_inline void ct6_put(struct ct6_key *key, struct ct_value *value)
{
    if (key->protocol == IPPROTO_TCP)
        ct6_tcp.update(key, value);
    else
        ct6_any.update(key, value);
}

/* Track an allowed connection under both its directions; the reply half never replaces a
 * live forward entry of a connection the other way (it would never be judged again). */
static __always_inline void ct6_create(struct endpoint_info *ep, u8 direction, struct flow *f,
                                       u64 now, u8 proxy)
{
    struct ct6_key key = {};
    struct ct_value value = {.last_seen_ns = now, .generation = ep->generation,
                             .seen = CT_SEEN | (f->tcp_flags & CT_TRACED_FLAGS),
                             .flags = proxy ? CT_PROXY : 0};
    ct6_fill_key(&key, ep->endpoint_id, direction, f, 0);
    ct6_put(&key, &value);
    ct6_fill_key(&key, ep->endpoint_id, direction, f, 1);
    struct ct_value *other = ct6_get(&key);
    if (other && !(other->flags & CT_REPLY) && !ct_expired(other, f->protocol, ep, now))
        return;
    value.flags = CT_REPLY;
    value.seen = 0;
    ct6_put(&key, &value);
}

#endif
