/* The verdict for one packet at one endpoint's hook: parse, conntrack, policy, account. */
#ifndef MESHAGENT_ENFORCE_H
#define MESHAGENT_ENFORCE_H

#include "lib/conntrack.h"
#include "lib/lb.h"
#include "lib/policy.h"

static __always_inline int parse_flow(struct __sk_buff *skb, struct flow *f)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != htons(ETH_P_IP))
        return 0;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->ihl < 5)
        return 0;
    f->saddr = ip->saddr;
    f->daddr = ip->daddr;
    f->protocol = ip->protocol;
    f->l4_off = ETH_HLEN + ip->ihl * 4;
    void *l4 = (void *)ip + ip->ihl * 4;
    if (ip->frag_off & htons(0x1FFF))  /* a later fragment: no ports to read */
        return 1;
    if (ip->protocol == IPPROTO_TCP) {
        struct tcphdr *tcp = l4;
        if ((void *)(tcp + 1) > end)
            return 1;
        f->sport = ntohs(tcp->source);
        f->dport = ntohs(tcp->dest);
        f->tcp_flags = ((u8 *)tcp)[13];
    } else if (ip->protocol == IPPROTO_UDP || ip->protocol == IPPROTO_SCTP) {
        struct udphdr *udp = l4;  /* SCTP's ports sit where UDP's do */
        if ((void *)(udp + 1) > end)
            return 1;
        f->sport = ntohs(udp->source);
        f->dport = ntohs(udp->dest);
    }
    return 1;
}

static __always_inline void account(u32 reason, u32 bytes)
{
    struct metrics_value *m = metrics.lookup(&reason);
    if (m) {
        m->packets += 1;
        m->bytes += bytes;
    }
}

static __always_inline int enforce(struct __sk_buff *skb, u8 direction)
{
    u32 ifindex = skb->ifindex;
    struct endpoint_info *ep = endpoints.lookup(&ifindex);
    struct flow f = {};
    if (!ep || !parse_flow(skb, &f))
        return TC_ACT_OK;  /* not an endpoint of ours, or not IPv4 */
    /* leaving the pod towards a service frontend: pick a backend first, so conntrack and
     * policy see (and judge) the connection to the backend */
    if (direction == DIR_EGRESS)
        lb_forward(skb, &f);
    u64 now = bpf_ktime_get_ns();
    if (ct_lookup(ep->endpoint_id, direction, &f, now)) {
        if (direction == DIR_INGRESS)
            lb_reverse(skb, &f);
        account(REASON_FORWARDED, skb->len);
        return TC_ACT_OK;
    }
    /* the peer: the source entering the pod, the destination leaving it */
    u32 peer = direction == DIR_INGRESS ? ipcache_identity(f.saddr) : ipcache_identity(f.daddr);
    int reason = policy_check(ep->endpoint_id, direction, peer, f.protocol, f.dport);
    if (reason == REASON_FORWARDED) {
        ct_create(ep->endpoint_id, direction, &f, now);
        if (direction == DIR_INGRESS)
            lb_reverse(skb, &f);
        account(REASON_FORWARDED, skb->len);
        return TC_ACT_OK;
    }
    account(reason, skb->len);
    struct drop_event event = {.time_ns = now, .reason = reason,
                               .endpoint_id = ep->endpoint_id, .saddr = f.saddr,
                               .daddr = f.daddr, .sport = f.sport, .dport = f.dport,
                               .protocol = f.protocol, .tcp_flags = f.tcp_flags,
                               .direction = direction};
    event.src_identity = direction == DIR_INGRESS ? peer : ep->identity;
    event.dst_identity = direction == DIR_INGRESS ? ep->identity : peer;
    drop_events.perf_submit(skb, &event, sizeof(event));
    return TC_ACT_SHOT;
}

#endif
