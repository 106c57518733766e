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

/* The key of the other half of a connection: the reverse tuple, through the NAT the entry
 * keeps (a forward entry to a service frontend has its reply from the backend). */
static __always_inline void ct_other_half(struct ct_key *key, struct ct_value *value,
                                          struct ct_key *other)
{
    struct flow back = {.saddr = key->daddr, .daddr = key->saddr, .sport = key->dport,
                        .dport = key->sport, .protocol = key->protocol};
    if (value->flags & CT_NAT_DST) {
        back.saddr = value->nat_ip;
        back.sport = value->nat_port;
    } else if (value->flags & CT_NAT_SRC) {
        back.daddr = value->nat_ip;
        back.dport = value->nat_port;
    }
    ct_fill_key(other, key->endpoint_id, key->direction ^ 1, &back);
}

static __always_inline int ct_closing(struct ct_value *value)
{
    return value->closing & CT_CLOSE_RST ||
           (value->closing & (CT_CLOSE_FIN | CT_CLOSE_FIN_OTHER)) ==
               (CT_CLOSE_FIN | CT_CLOSE_FIN_OTHER);
}

/* Whether an entry is past its idle lifetime (short once the connection is closing), or older
 * than the endpoint: an endpoint that had its id before owned it. */
static __always_inline int ct_expired(struct ct_value *value, u8 protocol,
                                      struct endpoint_info *ep, u64 now)
{
    u64 lifetime = protocol != IPPROTO_TCP ? CT_LIFETIME_ANY_NS
                   : ct_closing(value)     ? CT_CLOSE_TIMEOUT_NS
                                           : CT_LIFETIME_TCP_NS;
    return now - value->last_seen_ns > lifetime || value->generation < ep->born;
}

/* A SYN without ACK on a closing connection's entry: a new connection on the old tuple. */
static __always_inline int ct_reopens(struct ct_value *value, struct flow *f)
{
    return f->protocol == IPPROTO_TCP && (f->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN &&
           ct_closing(value);
}

/* The bits a FIN or RST sets in its own direction's entry and in the other half's. */
static __always_inline u8 ct_close_bits(u8 tcp_flags, int own)
{
    if (tcp_flags & TCP_RST)
        return CT_CLOSE_RST;
    if (tcp_flags & TCP_FIN)
        return own ? CT_CLOSE_FIN : CT_CLOSE_FIN_OTHER;
    return 0;
}

/* The live entry for this packet's tuple, or 0. An entry older than the endpoint belongs to
 * an endpoint that had its id before: not this one's. Refreshes last-seen at most once a
 * second — both halves of the connection, so that they live and expire together (a write per
 * packet would dirty the entries' cache lines on every packet). */
static __always_inline struct ct_value *ct_lookup(struct ct_key *key, struct endpoint_info *ep,
                                                  u64 now)
{
    int tcp = key->protocol == IPPROTO_TCP;
    struct ct_value *value = tcp ? ct_tcp.lookup(key) : ct_any.lookup(key);
    if (!value)
        return 0;
    if (ct_expired(value, key->protocol, ep, now)) {
        if (tcp)
            ct_tcp.delete(key);
        else
            ct_any.delete(key);
        return 0;
    }
    if (now - value->last_seen_ns > 1000000000ULL) {
        value->last_seen_ns = now;
        struct ct_key other = {};
        ct_other_half(key, value, &other);
        struct ct_value *half = tcp ? ct_tcp.lookup(&other) : ct_any.lookup(&other);
        if (half)
            half->last_seen_ns = now;
    }
    return value;
}

/* A passing TCP packet of a known connection with a FIN or RST: both halves learn it (once),
 * and their lifetime counts from now. */
static __always_inline void ct_note_close(struct ct_key *key, struct ct_value *value,
                                          struct flow *f, u64 now)
{
    u8 own = ct_close_bits(f->tcp_flags, 1);
    if (f->protocol != IPPROTO_TCP || !own || (value->closing & own) == own)
        return;
    value->closing |= own;
    value->last_seen_ns = now;
    struct ct_key other = {};
    ct_other_half(key, value, &other);
    struct ct_value *half = ct_tcp.lookup(&other);
    if (half) {
        half->closing |= ct_close_bits(f->tcp_flags, 0);
        half->last_seen_ns = now;
    }
}

/* Forget a connection (both halves), for a new one on its tuple. */
static __always_inline void ct_forget(struct ct_key *key, struct ct_value *value)
{
    struct ct_key other = {};
    ct_other_half(key, value, &other);
    ct_tcp.delete(&other);
    ct_tcp.delete(key);
}

/* Whether a packet of a known connection is reported: the first of its direction, or one
 * with a SYN, FIN or RST its direction had not shown (Cilium's monitor aggregation); then
 * recorded, so the entry is written only when something is reported. */
static __always_inline int ct_trace(struct ct_value *value, struct flow *f)
{
    u8 seen = CT_SEEN | (f->tcp_flags & CT_TRACED_FLAGS);
    if ((value->seen & seen) == seen)
        return 0;
    value->seen |= seen;
    return 1;
}

static __always_inline void ct_put(struct ct_key *key, struct ct_value *value)
{
    if (key->protocol == IPPROTO_TCP)
        ct_tcp.update(key, value);
    else
        ct_any.update(key, value);
}

/* Whether ``key`` holds a live entry of a connection the other way, judged by policy. */
static __always_inline int ct_live_forward(struct ct_key *key, struct endpoint_info *ep,
                                           u64 now)
{
    struct ct_value *value = key->protocol == IPPROTO_TCP ? ct_tcp.lookup(key)
                                                          : ct_any.lookup(key);
    return value && !(value->flags & CT_REPLY) && !ct_expired(value, key->protocol, ep, now);
}

/* Track an allowed connection. ``orig`` is the packet as it reached the hook, ``f`` as it
 * leaves (after a service DNAT, if any): the forward entry is keyed by the first (and says
 * CT_PROXY when its packets go to the DNS proxy), the reply entry by the reverse of the
 * second, and undoes the DNAT. */
static __always_inline void ct_create(struct endpoint_info *ep, u8 direction,
                                      struct flow *orig, struct flow *f, u64 now, u8 proxy)
{
    struct ct_key key = {};
    struct ct_value value = {.last_seen_ns = now, .generation = ep->generation,
                             .seen = CT_SEEN | (f->tcp_flags & CT_TRACED_FLAGS),
                             .flags = proxy ? CT_PROXY : 0};
    int nat = orig->daddr != f->daddr || orig->dport != f->dport;
    ct_fill_key(&key, ep->endpoint_id, direction, orig);
    if (nat) {
        value.flags |= CT_NAT_DST;
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
    value.seen = 0;  /* its first packet is reported */
    value.nat_ip = 0;
    value.nat_port = 0;
    if (nat) {
        value.flags |= CT_NAT_SRC;
        value.nat_ip = orig->daddr;
        value.nat_port = orig->dport;
    }
    /* never over a live entry of a connection the other way: a reply entry is never judged
     * again, so it must not replace one that is */
    if (!ct_live_forward(&key, ep, now))
        ct_put(&key, &value);
}

#endif
