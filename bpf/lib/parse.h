/* Parsing an IPv4 packet into a flow, and the fragment rules.
 *
 * Headers are read in place; the few bytes read are pulled into the linear part of the skb
 * only when they are not there already. A packet whose IPv4 header is bad, or whose transport
 * header is cut short though it is not a fragment, is malformed. Fragments follow RFC 1858 and Cilium's lib/ipfrag.h: a
 * first fragment must hold the whole transport header, a later one may not overlap it, and a
 * later fragment takes the ports its first fragment recorded. */
#ifndef MESHAGENT_PARSE_H
#define MESHAGENT_PARSE_H

#include "lib/maps.h"

#define PARSE_ARP (-1)
#define IP_MORE_FRAGMENTS 0x2000
#define IP_OFFSET_MASK 0x1FFF
#define FRAG_NONE 0
#define FRAG_FIRST 1
#define FRAG_LATER 2

struct packet {
    struct flow f;
    u8 frag;         /* FRAG_NONE, FRAG_FIRST or FRAG_LATER */
    u8 l4_short;     /* this packet does not hold the whole transport header */
    u16 ip_id;       /* network byte order */
    u32 frag_offset; /* bytes */
};

/* The transport header length that must be whole in a first fragment: every port-carrying
 * protocol's ports, and TCP's flags (RFC 1858). 0: a protocol without ports. */
static __always_inline u32 l4_min_len(u8 protocol)
{
    if (protocol == IPPROTO_TCP)
        return 20;
    if (protocol == IPPROTO_UDP)
        return 8;
    if (protocol == IPPROTO_SCTP)
        return 12;
    return 0;
}

/* Make the first ``len`` bytes linear (directly readable), pulling them in only when they
 * are not: a packet from a local socket carries its payload in page fragments, and pulling it
 * in would copy (and maybe reallocate) on every packet. 0 if the packet is shorter. */
static __always_inline int linear(struct __sk_buff *skb, u32 len)
{
    if ((void *)(long)skb->data + len <= (void *)(long)skb->data_end)
        return 1;
    if (skb->len < len)
        return 0;
    return bpf_skb_pull_data(skb, len) == 0;
}

/* REASON_FORWARDED when ``p`` is filled, PARSE_ARP, REASON_UNSUPPORTED_L3 (another
 * ethertype: the datapath cannot judge it, so it never passes an enforcing endpoint), or
 * REASON_MALFORMED. */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct packet *p)
{
    if (!linear(skb, ETH_HLEN))
        return REASON_MALFORMED;
    struct ethhdr *eth = (void *)(long)skb->data;
    if ((void *)(eth + 1) > (void *)(long)skb->data_end)
        return REASON_MALFORMED;
    if (eth->h_proto == htons(ETH_P_ARP))
        return PARSE_ARP;
    if (eth->h_proto != htons(ETH_P_IP))
        return REASON_UNSUPPORTED_L3;
    if (!linear(skb, ETH_HLEN + sizeof(struct iphdr)))
        return REASON_MALFORMED;
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct iphdr *ip = data + ETH_HLEN;
    if ((void *)(ip + 1) > end || ip->version != 4 || ip->ihl < 5)
        return REASON_MALFORMED;
    u32 hlen = (ip->ihl & 0xF) * 4;
    u32 tot_len = ntohs(ip->tot_len);
    if (!tot_len && skb->gso_size)  /* BIG TCP: a GSO packet over 64 KiB says 0 */
        tot_len = skb->len - ETH_HLEN;
    if (tot_len < hlen || tot_len > skb->len - ETH_HLEN)
        return REASON_MALFORMED;
    struct flow *f = &p->f;
    f->saddr = ip->saddr;
    f->daddr = ip->daddr;
    f->protocol = ip->protocol;
    f->l4_off = ETH_HLEN + hlen;
    u16 frag_off = ntohs(ip->frag_off);
    p->ip_id = ip->id;
    p->frag_offset = (frag_off & IP_OFFSET_MASK) * 8;
    if (p->frag_offset)
        p->frag = FRAG_LATER;
    else if (frag_off & IP_MORE_FRAGMENTS)
        p->frag = FRAG_FIRST;
    if (p->frag == FRAG_LATER)
        return REASON_FORWARDED;  /* no transport header here: ports come from ipfrag */
    u32 need = l4_min_len(f->protocol);
    if (!need)
        return REASON_FORWARDED;
    if (tot_len - hlen < need) {
        p->l4_short = 1;
        return p->frag == FRAG_FIRST ? REASON_FORWARDED : REASON_MALFORMED;
    }
    /* read the ports (and TCP's flags): only those bytes need to be linear */
    u32 l4_off = ETH_HLEN + hlen;
    int tcp = f->protocol == IPPROTO_TCP;
    if (!linear(skb, l4_off + (tcp ? 14 : 4)))
        return REASON_MALFORMED;
    data = (void *)(long)skb->data;
    end = (void *)(long)skb->data_end;
    void *l4 = data + l4_off;
    if (l4 + 4 > end || (tcp && l4 + 14 > end))
        return REASON_MALFORMED;
    struct udphdr *ports = l4;  /* TCP's, UDP's and SCTP's ports sit in the same place */
    f->sport = ntohs(ports->source);
    f->dport = ntohs(ports->dest);
    f->has_l4 = 1;
    if (tcp)
        f->tcp_flags = ((u8 *)l4)[13];
    return REASON_FORWARDED;
}

/* The fragment rules, once the packet passed the source check: REASON_FORWARDED or a drop
 * reason; a later fragment gets its first fragment's ports. */
static __always_inline int fragment_check(struct packet *p)
{
    if (p->frag == FRAG_NONE)
        return REASON_FORWARDED;
    u32 need = l4_min_len(p->f.protocol);
    if (!need)
        return REASON_FORWARDED;  /* no ports: every fragment is judged as it is */
    struct ipfrag_key key = {.saddr = p->f.saddr, .daddr = p->f.daddr, .id = p->ip_id,
                             .protocol = p->f.protocol};
    if (p->frag == FRAG_FIRST) {
        if (p->l4_short)
            return REASON_FRAG_TINY;
        struct ipfrag_ports ports = {.sport = p->f.sport, .dport = p->f.dport};
        ipfrag.update(&key, &ports);
        return REASON_FORWARDED;
    }
    if (p->frag_offset < need)
        return REASON_FRAG_TINY;  /* would overwrite part of the transport header */
    struct ipfrag_ports *ports = ipfrag.lookup(&key);
    if (!ports)
        return REASON_FRAG_UNKNOWN;
    p->f.sport = ports->sport;
    p->f.dport = ports->dport;
    return REASON_FORWARDED;
}

#endif
