/* The verdict for one packet at one endpoint's hook.
 *
 * Order: parse (malformed: drop) -> source check (leaving the pod) -> ICMPv4 fragmentation
 * needed passes -> fragment rules ->
 * conntrack (one lookup; a reply passes, a known forward packet passes unless policy or the
 * ipcache changed since it was judged) -> service frontend (new connections leaving a pod) ->
 * policy (two LPM lookups) -> track it. IPv6 takes the same steps with its own ipcache and
 * conntrack maps (no services, no local redirect). ARP and the link's ICMPv6 control
 * messages (neighbour discovery, MLD) pass; any other ethertype is dropped: nothing passes
 * unjudged because of its family.
 *
 * A packet leaving a pod for another pod of this node is judged by the destination's ingress
 * policy right there, then redirected into the destination pod (bpf_redirect_peer), as
 * Cilium delivers locally: it skips the node's routing and the second veth.
 *
 * A packet leaving the pod whose policy entry is a redirect (TCP or UDP) is tracked as an
 * allowed one, its forward entry remembering the redirect, and it and every later packet of
 * its direction go to the DNS proxy's socket on this node (lib/proxy.h), never to their
 * destination: the proxy's answer, sent from the destination's address, passes as a reply.
 *
 * Every hook reports through the flow_events perf array what core/datapath/events.py says:
 * each drop; each packet policy judged that passes (forwarded, or an audit when the endpoint
 * is in audit mode: what policy would drop passes and is tracked as if allowed); a trace for
 * the first packet of a reply direction and a SYN, FIN or RST new for its direction. Drops
 * other than policy's are never audited.
 *
 * A TCP connection whose both directions sent a FIN, or either an RST, is closing: its entries
 * live 10 s more, and a SYN (without ACK) on them forgets it and starts a new connection,
 * judged and reported as new (Cilium's CT_CLOSE_TIMEOUT and CT_REOPENED). */
#ifndef MESHAGENT_ENFORCE_H
#define MESHAGENT_ENFORCE_H

#include "lib/conntrack.h"
#include "lib/conntrack6.h"
#include "lib/lb.h"
#include "lib/parse.h"
#include "lib/policy.h"
#include "lib/proxy.h"

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

/* What one hook makes of a packet, for its flow event (kind 0: nothing to report). */
struct judgement {
    u32 reason;     /* REASON_*: the drop's, an audit's would-be drop, or forwarded */
    u32 peer;       /* the peer's identity (0: not looked up) */
    u8 kind;
    u8 verdict;
    u8 is_reply;
    u8 match;
    u8 redirect;    /* the packet goes to the DNS proxy */
};

static __always_inline void report(struct __sk_buff *skb, struct endpoint_info *ep,
                                   u8 direction, struct flow *f, struct judgement *j, u64 now)
{
    if (!j->kind || (!FLOW_EVENTS && j->kind != FLOW_DROP))
        return;
    struct flow_event event = {.time_ns = now, .reason = j->reason,
                               .endpoint_id = ep->endpoint_id, .saddr = f->saddr,
                               .daddr = f->daddr, .sport = f->sport, .dport = f->dport,
                               .protocol = f->protocol, .tcp_flags = f->tcp_flags,
                               .direction = direction, .family = f->family, .kind = j->kind,
                               .verdict = j->verdict, .is_reply = j->is_reply,
                               .match = j->match};
    __builtin_memcpy(event.saddr6, f->saddr6, 16);
    __builtin_memcpy(event.daddr6, f->daddr6, 16);
    if (f->has_icmp) {  /* ICMP has no ports: its type and code, as the observer reads them */
        event.sport = ((u16)f->icmp_type << 8) | f->icmp_code;
        event.dport = 0;
    }
    event.src_identity = direction == DIR_INGRESS ? j->peer : ep->identity;
    event.dst_identity = direction == DIR_INGRESS ? ep->identity : j->peer;
    /* never waits: with the buffer full the event is lost, and userspace counts it */
    flow_events.perf_submit(skb, &event, sizeof(event));
}

static __always_inline int drop(struct __sk_buff *skb, struct endpoint_info *ep, u8 direction,
                                struct flow *f, int reason, struct judgement *j, u64 now)
{
    skb->cb[0] = reason;
    account(reason, skb->len);
    j->kind = FLOW_DROP;
    j->verdict = FLOW_DROPPED;
    j->reason = reason;
    j->is_reply = 0;
    if (reason != REASON_POLICY_DENY)
        j->match = MATCH_NONE;
    report(skb, ep, direction, f, j, now);
    return TC_ACT_SHOT;
}

/* To the DNS proxy (lib/proxy.h), reported as judged; when the proxy cannot take it, dropped
 * and reported again as a drop (as Cilium sends a policy verdict, then the drop). */
static __always_inline int redirect_to_proxy(struct __sk_buff *skb, struct endpoint_info *ep,
                                             u8 direction, struct flow *f, struct judgement *j,
                                             u64 now)
{
    report(skb, ep, direction, f, j, now);
    int reason = to_proxy(skb, f);
    if (reason != REASON_REDIRECTED)
        return drop(skb, ep, direction, f, reason, j, now);
    skb->cb[0] = REASON_REDIRECTED;
    account(REASON_REDIRECTED, skb->len);
    return TC_ACT_OK;
}

/* ICMPv4 fragmentation needed (destination unreachable, code 4): it passes without policy or
 * tracking, so path MTU discovery always works (Cilium's ALLOW_ICMP_FRAG_NEEDED). */
static __always_inline int frag_needed(struct flow *f)
{
    return f->family == 4 && f->protocol == IPPROTO_ICMP && f->has_icmp &&
           f->icmp_type == 3 && f->icmp_code == 4;
}

/* The peer: the source entering the pod, the destination leaving it. */
static __always_inline u32 peer_identity(u8 direction, struct flow *f)
{
    if (f->family == 6)
        return ipcache6_identity(direction == DIR_INGRESS ? f->saddr6 : f->daddr6);
    return ipcache_identity(direction == DIR_INGRESS ? f->saddr : f->daddr);
}

/* Policy for a new connection's packet, or a known one's judged again: REASON_FORWARDED
 * (``j`` then holds its policy verdict: forwarded, or in audit mode an audit of what policy
 * would have dropped, with that reason) or the drop reason (``j`` holds peer and match). */
static __always_inline int judge(struct endpoint_info *ep, u8 direction, struct flow *f,
                                 struct judgement *j)
{
    j->peer = peer_identity(direction, f);
    j->redirect = 0;
    int reason = policy_check(ep->endpoint_id, direction, j->peer, f->protocol, f->dport,
                              &j->match, &j->redirect);
    if (j->redirect && (direction != DIR_EGRESS ||
                        (f->protocol != IPPROTO_TCP && f->protocol != IPPROTO_UDP))) {
        j->redirect = 0;  /* the proxy takes TCP and UDP leaving a pod only */
        return REASON_PROXY_UNSUPPORTED;
    }
    if (reason != REASON_FORWARDED && !(ep->flags & ENDPOINT_POLICY_AUDIT))
        return reason;
    j->kind = FLOW_POLICY_VERDICT;
    j->verdict = reason != REASON_FORWARDED ? FLOW_AUDIT
                 : j->redirect             ? FLOW_REDIRECTED
                                           : FLOW_FORWARDED;
    j->reason = reason;
    return REASON_FORWARDED;
}

/* A packet of a known connection that passes without policy: a trace when ct_trace says. */
static __always_inline void known(struct ct_value *ct, u8 direction, struct flow *f,
                                  struct judgement *j)
{
    if (!FLOW_EVENTS || !ct_trace(ct, f))
        return;
    j->kind = FLOW_TRACE;
    j->verdict = FLOW_FORWARDED;
    j->reason = REASON_FORWARDED;
    j->is_reply = ct->flags & CT_REPLY ? 1 : 0;
    j->peer = peer_identity(direction, f);
}

/* Conntrack, service frontend and policy for one endpoint and direction: REASON_FORWARDED
 * (the packet may have been rewritten by service NAT, and ``f`` with it) or a drop reason;
 * ``j`` says what to report. */
static __always_inline int verdict(struct __sk_buff *skb, struct endpoint_info *ep,
                                   u8 direction, struct flow *f, u64 now, struct judgement *j)
{
    struct ct_key key = {};
    ct_fill_key(&key, ep->endpoint_id, direction, f);
    struct ct_value *ct = ct_lookup(&key, ep, now);
    if (ct && ct_reopens(ct, f)) {  /* judged and tracked as the new connection it is */
        ct_forget(&key, ct);
        ct = 0;
    }
    if (ct) {
        if (ct->flags & CT_REPLY || ct->generation == ep->generation) {
            j->redirect = ct->flags & CT_PROXY ? 1 : 0;
            known(ct, direction, f, j);
            ct_note_close(&key, ct, f, now);
            ct_apply_nat(skb, f, ct);
            return REASON_FORWARDED;
        }
        /* policy, the ipcache or audit mode changed since this connection was judged:
         * judge it again, against where it really goes */
        struct flow judged = *f;
        if (ct->flags & CT_NAT_DST) {
            judged.daddr = ct->nat_ip;
            judged.dport = ct->nat_port;
        }
        int reason = judge(ep, direction, &judged, j);
        if (reason != REASON_FORWARDED)
            return reason;
        ct->generation = ep->generation;
        ct->flags = j->redirect ? ct->flags | CT_PROXY : ct->flags & ~CT_PROXY;
        ct->seen |= CT_SEEN | (f->tcp_flags & CT_TRACED_FLAGS);
        ct_note_close(&key, ct, f, now);
        ct_apply_nat(skb, f, ct);
        return REASON_FORWARDED;
    }
    struct flow orig = *f;
    if (direction == DIR_EGRESS)
        lb_select(skb, f);  /* policy judges the backend, not the frontend */
    int reason = judge(ep, direction, f, j);
    if (reason != REASON_FORWARDED)
        return reason;
    ct_create(ep, direction, &orig, f, now, j->redirect);
    return REASON_FORWARDED;
}

/* verdict() for IPv6: conntrack and policy. */
static __always_inline int verdict6(struct endpoint_info *ep, u8 direction, struct flow *f,
                                    u64 now, struct judgement *j)
{
    struct ct_value *ct = ct6_lookup(ep, direction, f, now);
    if (ct && ct_reopens(ct, f)) {
        ct6_forget(ep, direction, f);
        ct = 0;
    }
    if (ct && (ct->flags & CT_REPLY || ct->generation == ep->generation)) {
        j->redirect = ct->flags & CT_PROXY ? 1 : 0;
        known(ct, direction, f, j);
        ct6_note_close(ep, direction, ct, f, now);
        return REASON_FORWARDED;
    }
    int reason = judge(ep, direction, f, j);
    if (reason != REASON_FORWARDED)
        return reason;
    if (ct) {  /* judged again after a change, and still allowed */
        ct->generation = ep->generation;
        ct->flags = j->redirect ? ct->flags | CT_PROXY : ct->flags & ~CT_PROXY;
        ct->seen |= CT_SEEN | (f->tcp_flags & CT_TRACED_FLAGS);
        ct6_note_close(ep, direction, ct, f, now);
    } else {
        ct6_create(ep, direction, f, now, j->redirect);
    }
    return REASON_FORWARDED;
}

/* Whether an IPv6 packet leaving the pod carries the pod's own IPv6 address. */
static __always_inline int own_ipv6(struct endpoint_info *ep, struct flow *f)
{
    return ep->flags & ENDPOINT_HAS_IPV6 && f->saddr6[0] == ep->ipv6[0] &&
           f->saddr6[1] == ep->ipv6[1] && f->saddr6[2] == ep->ipv6[2] &&
           f->saddr6[3] == ep->ipv6[3];
}

/* Into a local pod without the node's stack: decrement the TTL (as a router would), address
 * the pod's eth0 from its host-side veth, and hand it over. Written in place, no helpers.
 * TC_ACT_OK (the stack's way) when it cannot. */
static __always_inline int deliver_locally(struct __sk_buff *skb, struct endpoint_info *dst)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = data + ETH_HLEN;
    if ((void *)(ip + 1) > end || ip->ttl <= 1)
        return TC_ACT_OK;  /* the stack answers an expiring TTL */
    u32 check = ip->check;  /* the kernel's ip_decrease_ttl(): TTL is the checksum word's MSB */
    check += htons(0x0100);
    ip->check = (u16)(check + (check >= 0xFFFF));
    ip->ttl -= 1;
    __builtin_memcpy(eth->h_dest, dst->pod_mac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, dst->host_mac, ETH_ALEN);
    return bpf_redirect_peer(dst->ifindex, 0);
}

static __always_inline int enforce(struct __sk_buff *skb, u8 direction)
{
    u32 ifindex = skb->ifindex;
    struct endpoint_info *ep = endpoints.lookup(&ifindex);
    if (!ep)
        return TC_ACT_OK;  /* not an endpoint of ours */
    struct packet p = {};
    struct judgement j = {};
    u64 now = bpf_ktime_get_ns();
    int reason = parse(skb, &p);
    if (reason == PARSE_ARP)
        return pass(skb);
    if (reason != REASON_FORWARDED)
        return drop(skb, ep, direction, &p.f, reason, &j, now);
    if (link_control(&p, direction))
        return pass(skb);
    int v6 = p.f.family == 6;
    if (direction == DIR_EGRESS && (v6 ? !own_ipv6(ep, &p.f) : p.f.saddr != ep->ipv4))
        return drop(skb, ep, direction, &p.f, REASON_SPOOFED, &j, now);
    if (frag_needed(&p.f))
        return pass(skb);
    reason = fragment_check(&p);
    if (reason != REASON_FORWARDED)
        return drop(skb, ep, direction, &p.f, reason, &j, now);
    if (v6) {
        reason = verdict6(ep, direction, &p.f, now, &j);
        if (reason != REASON_FORWARDED)
            return drop(skb, ep, direction, &p.f, reason, &j, now);
        if (j.redirect)
            return redirect_to_proxy(skb, ep, direction, &p.f, &j, now);
        report(skb, ep, direction, &p.f, &j, now);
        return pass(skb);
    }
    reason = verdict(skb, ep, direction, &p.f, now, &j);
    if (reason != REASON_FORWARDED)
        return drop(skb, ep, direction, &p.f, reason, &j, now);
    if (j.redirect)
        return redirect_to_proxy(skb, ep, direction, &p.f, &j, now);
    report(skb, ep, direction, &p.f, &j, now);
    if (direction == DIR_EGRESS) {
        u32 daddr = p.f.daddr;
        u32 *local = local_ips.lookup(&daddr);
        struct endpoint_info *dst = local ? endpoints.lookup(local) : 0;
        if (dst && dst->flags & ENDPOINT_LOCAL_DELIVERY) {
            struct judgement k = {};
            reason = verdict(skb, dst, DIR_INGRESS, &p.f, now, &k);
            if (reason != REASON_FORWARDED)
                return drop(skb, dst, DIR_INGRESS, &p.f, reason, &k, now);
            report(skb, dst, DIR_INGRESS, &p.f, &k, now);
            int action = deliver_locally(skb, dst);
            if (action == TC_ACT_OK)
                return pass(skb);  /* through the stack after all */
            skb->cb[0] = REASON_FORWARDED;
            account(REASON_FORWARDED, skb->len);
            return action;
        }
    }
    return pass(skb);
}

#endif
