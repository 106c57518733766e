/* Service load balancing at tc level: a new connection to a frontend gets a backend, and the
 * packet is rewritten to it; conntrack keeps the choice (and the way back) for the rest of
 * the connection. */
#ifndef MESHAGENT_LB_H
#define MESHAGENT_LB_H

#include <uapi/linux/in.h>
#include "lib/maps.h"

#define IP_SRC_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DST_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))
#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))

static __always_inline int l4_csum_off(struct flow *f)
{
    if (!f->has_l4)
        return -1;  /* a later fragment: the transport checksum is in the first one */
    if (f->protocol == IPPROTO_TCP)
        return f->l4_off + 16;
    if (f->protocol == IPPROTO_UDP)
        return f->l4_off + 6;
    return -1;
}

/* Rewrite one address and port (source when src is set, destination otherwise). */
static __always_inline void rewrite(struct __sk_buff *skb, struct flow *f, int src,
                                    u32 new_ip, u16 new_port)
{
    u32 old_ip = src ? f->saddr : f->daddr;
    u16 old_port = htons(src ? f->sport : f->dport);
    u16 port_be = htons(new_port);
    int csum = l4_csum_off(f);
    u64 flags = f->protocol == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
    if (csum >= 0) {
        bpf_l4_csum_replace(skb, csum, old_ip, new_ip, flags | BPF_F_PSEUDO_HDR | sizeof(u32));
        bpf_l4_csum_replace(skb, csum, old_port, port_be, flags | sizeof(u16));
        bpf_skb_store_bytes(skb, f->l4_off + (src ? 0 : 2), &port_be, sizeof(u16), 0);
    }
    bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_ip, new_ip, sizeof(u32));
    bpf_skb_store_bytes(skb, src ? IP_SRC_OFF : IP_DST_OFF, &new_ip, sizeof(u32), 0);
    if (src) {
        f->saddr = new_ip;
        f->sport = new_port;
    } else {
        f->daddr = new_ip;
        f->dport = new_port;
    }
}

/* A new connection leaving a pod: if it goes to a service frontend, rewrite it to a backend
 * picked at random. */
static __always_inline void lb_select(struct __sk_buff *skb, struct flow *f)
{
    if (f->protocol != IPPROTO_TCP && f->protocol != IPPROTO_UDP)
        return;
    struct lb_service_key sk = {.vip = f->daddr, .port = f->dport, .protocol = f->protocol};
    struct lb_service *svc = lb_services.lookup(&sk);
    if (!svc || svc->count == 0)
        return;
    struct lb_backend_key bk = {.service_id = svc->service_id,
                                .slot = bpf_get_prandom_u32() % svc->count};
    struct lb_backend *be = lb_backends.lookup(&bk);
    if (be)
        rewrite(skb, f, 0, be->ip, be->port);
}

/* A packet of a tracked connection: apply the NAT its entry remembers. */
static __always_inline void ct_apply_nat(struct __sk_buff *skb, struct flow *f,
                                         struct ct_value *ct)
{
    if (ct->flags & CT_NAT_DST)
        rewrite(skb, f, 0, ct->nat_ip, ct->nat_port);
    else if (ct->flags & CT_NAT_SRC)
        rewrite(skb, f, 1, ct->nat_ip, ct->nat_port);
}

#endif
