/* The verdict for one packet at one endpoint's hook.
 *
 * Order: parse (malformed: drop) -> source check (leaving the pod) -> fragment rules ->
 * conntrack (one lookup; a reply passes, a known forward packet passes unless policy or the
 * ipcache changed since it was judged) -> service frontend (new connections leaving a pod) ->
 * policy (two LPM lookups) -> track it. Non-IPv4 traffic (ARP) passes. */
#ifndef MESHAGENT_ENFORCE_H
#define MESHAGENT_ENFORCE_H

#include "lib/conntrack.h"
#include "lib/lb.h"
#include "lib/parse.h"
#include "lib/policy.h"

static __always_inline void account(u32 reason, u32 bytes)
{
    struct metrics_value *m = metrics.lookup(&reason);
    if (m) {
        m->packets += 1;
        m->bytes += bytes;
    }
}

static __always_inline int pass(struct __sk_buff *skb)
{
    skb->cb[0] = REASON_FORWARDED;
    account(REASON_FORWARDED, skb->len);
    return TC_ACT_OK;
}

static __always_inline int drop(struct __sk_buff *skb, struct endpoint_info *ep, u8 direction,
                                struct flow *f, int reason, u32 peer, u64 now)
{
    skb->cb[0] = reason;
    account(reason, skb->len);
    struct drop_event event = {.time_ns = now, .reason = reason,
                               .endpoint_id = ep->endpoint_id, .saddr = f->saddr,
                               .daddr = f->daddr, .sport = f->sport, .dport = f->dport,
                               .protocol = f->protocol, .tcp_flags = f->tcp_flags,
                               .direction = direction};
    event.src_identity = direction == DIR_INGRESS ? peer : ep->identity;
    event.dst_identity = direction == DIR_INGRESS ? ep->identity : peer;
    drop_events.perf_submit(skb, &event, sizeof(event));
    return TC_ACT_SHOT;
}

static __always_inline int judge(struct endpoint_info *ep, u8 direction, struct flow *f,
                                 u32 *peer)
{
    /* the peer: the source entering the pod, the destination leaving it */
    *peer = ipcache_identity(direction == DIR_INGRESS ? f->saddr : f->daddr);
    return policy_check(ep->endpoint_id, direction, *peer, f->protocol, f->dport);
}

static __always_inline int enforce(struct __sk_buff *skb, u8 direction)
{
    u32 ifindex = skb->ifindex;
    struct endpoint_info *ep = endpoints.lookup(&ifindex);
    if (!ep)
        return TC_ACT_OK;  /* not an endpoint of ours */
    struct packet p = {};
    u64 now = bpf_ktime_get_ns();
    int reason = parse_ipv4(skb, &p);
    if (reason == PARSE_NOT_IPV4)
        return pass(skb);
    if (reason != REASON_FORWARDED)
        return drop(skb, ep, direction, &p.f, reason, 0, now);
    if (direction == DIR_EGRESS && p.f.saddr != ep->ipv4)
        return drop(skb, ep, direction, &p.f, REASON_SPOOFED, 0, now);
    reason = fragment_check(&p);
    if (reason != REASON_FORWARDED)
        return drop(skb, ep, direction, &p.f, reason, 0, now);

    struct flow *f = &p.f;
    struct ct_key key = {};
    ct_fill_key(&key, ep->endpoint_id, direction, f);
    struct ct_value *ct = ct_lookup(&key, now);
    u32 peer = 0;
    if (ct) {
        if (ct->flags & CT_REPLY || ct->generation == ep->generation) {
            ct_apply_nat(skb, f, ct);
            return pass(skb);
        }
        /* policy or the ipcache changed since this connection was judged: judge it again,
         * against where it really goes */
        struct flow judged = *f;
        if (ct->flags & CT_NAT_DST) {
            judged.daddr = ct->nat_ip;
            judged.dport = ct->nat_port;
        }
        reason = judge(ep, direction, &judged, &peer);
        if (reason != REASON_FORWARDED)
            return drop(skb, ep, direction, &judged, reason, peer, now);
        ct->generation = ep->generation;
        ct_apply_nat(skb, f, ct);
        return pass(skb);
    }
    struct flow orig = *f;
    if (direction == DIR_EGRESS)
        lb_select(skb, f);  /* policy judges the backend, not the frontend */
    reason = judge(ep, direction, f, &peer);
    if (reason != REASON_FORWARDED)
        return drop(skb, ep, direction, f, reason, peer, now);
    ct_create(ep->endpoint_id, direction, &orig, f, ep->generation, now);
    return pass(skb);
}

#endif
