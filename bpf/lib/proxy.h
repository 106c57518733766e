/* Handing a packet to the agent's DNS proxy on this node, its destination kept.
 *
 * As Cilium's bpf/lib/proxy.h with --enable-bpf-tproxy: at tc ingress of the pod's host-side
 * veth the packet is assigned to the proxy's socket (bpf_sk_lookup_* + bpf_sk_assign): a TCP
 * connection's own socket once the proxy accepted it, else the socket listening on the proxy
 * port (the proxy's sockets are IP_TRANSPARENT and bound to the wildcard address). The packet
 * is marked MARK_MAGIC_TO_PROXY, which the agent's ip rule routes through a table that
 * delivers every address locally: the kernel then hands it to the assigned socket instead of
 * forwarding it to its destination. */
#ifndef MESHAGENT_PROXY_H
#define MESHAGENT_PROXY_H

#include "lib/maps.h"

#define PROXY_TCP_LISTEN 10     /* BPF_TCP_LISTEN */
#define PROXY_TCP_TIME_WAIT 6   /* BPF_TCP_TIME_WAIT */

/* REASON_REDIRECTED once the socket is assigned, else REASON_PROXY_LOOKUP (no socket) or
 * REASON_PROXY_ASSIGN. ``tuple`` is the packet's; ``len`` its family's part of it. */
static __always_inline int proxy_assign_tcp(struct __sk_buff *skb, struct bpf_sock_tuple *tuple,
                                            u32 len, u16 port)
{
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, tuple, len, BPF_F_CURRENT_NETNS, 0);
    if (sk) {
        if (sk->state != PROXY_TCP_LISTEN && sk->state != PROXY_TCP_TIME_WAIT) {
            long err = bpf_sk_assign(skb, sk, 0);
            bpf_sk_release(sk);
            return err ? REASON_PROXY_ASSIGN : REASON_REDIRECTED;
        }
        bpf_sk_release(sk);
    }
    __builtin_memset(tuple, 0, sizeof(*tuple));
    if (len == sizeof(tuple->ipv4))
        tuple->ipv4.dport = htons(port);
    else
        tuple->ipv6.dport = htons(port);
    sk = bpf_skc_lookup_tcp(skb, tuple, len, BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return REASON_PROXY_LOOKUP;
    long err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    return err ? REASON_PROXY_ASSIGN : REASON_REDIRECTED;
}

static __always_inline int proxy_assign_udp(struct __sk_buff *skb, struct bpf_sock_tuple *tuple,
                                            u32 len, u16 port)
{
    __builtin_memset(tuple, 0, sizeof(*tuple));
    if (len == sizeof(tuple->ipv4))
        tuple->ipv4.dport = htons(port);
    else
        tuple->ipv6.dport = htons(port);
    struct bpf_sock *sk = bpf_sk_lookup_udp(skb, tuple, len, BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return REASON_PROXY_LOOKUP;
    long err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    return err ? REASON_PROXY_ASSIGN : REASON_REDIRECTED;
}

/* Send a TCP or UDP packet leaving a pod to the proxy: REASON_REDIRECTED, or why not. */
static __always_inline int to_proxy(struct __sk_buff *skb, struct flow *f)
{
    u32 zero = 0;
    u32 *configured = proxy_port.lookup(&zero);
    u16 port = configured ? (u16)*configured : 0;
    if (!port)
        return REASON_PROXY_LOOKUP;
    struct bpf_sock_tuple tuple = {};
    u32 len;
    if (f->family == 6) {
        __builtin_memcpy(tuple.ipv6.saddr, f->saddr6, 16);
        __builtin_memcpy(tuple.ipv6.daddr, f->daddr6, 16);
        tuple.ipv6.sport = htons(f->sport);
        tuple.ipv6.dport = htons(f->dport);
        len = sizeof(tuple.ipv6);
    } else {
        tuple.ipv4.saddr = f->saddr;
        tuple.ipv4.daddr = f->daddr;
        tuple.ipv4.sport = htons(f->sport);
        tuple.ipv4.dport = htons(f->dport);
        len = sizeof(tuple.ipv4);
    }
    skb->mark = MARK_MAGIC_TO_PROXY | ((u32)port << 16);
    bpf_skb_change_type(skb, 0);  /* PACKET_HOST: for this host */
    if (f->protocol == IPPROTO_TCP)
        return proxy_assign_tcp(skb, &tuple, len, port);
    return proxy_assign_udp(skb, &tuple, len, port);
}

#endif
