/* Parsing an IPv4 packet into a flow, and the fragment rules.
 *
 * Headers are read in place; a header that is not in the linear part of the skb is pulled in
 * first. A packet whose IPv4 header is bad, or whose transport header is cut short though it
 * is not a fragment, is malformed. Fragments follow RFC 1858 and Cilium's lib/ipfrag.h: a
 * first fragment must hold the whole transport header, a later one may not overlap it, and a
 * later fragment takes the ports its first fragment recorded. */
#ifndef MESHAGENT_PARSE_H
#define MESHAGENT_PARSE_H

#include "lib/maps.h"

#define PARSE_NOT_IPV4 (-1)
#define IP_MORE_FRAGMENTS 0x2000
#define IP_OFFSET_MASK 0x1FFF
#define FRAG_NONE 0
#define FRAG_FIRST 1
#define FRAG_LATER 2
#define PULL_MAX (ETH_HLEN + 60 + 20)  /* Ethernet, the longest IPv4 header, TCP */

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

/* REASON_FORWARDED when ``p`` is filled, PARSE_NOT_IPV4, or REASON_MALFORMED. */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct packet *p)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    if (data + PULL_MAX > end && skb->len > end - data) {
        bpf_skb_pull_data(skb, skb->len < PULL_MAX ? skb->len : PULL_MAX);
        data = (void *)(long)skb->data;
        end = (void *)(long)skb->data_end;
    }
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return REASON_MALFORMED;
    if (eth->h_proto != htons(ETH_P_IP))
        return PARSE_NOT_IPV4;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->version != 4 || ip->ihl < 5)
        return REASON_MALFORMED;
    u32 hlen = ip->ihl * 4;
    u32 tot_len = ntohs(ip->tot_len);
    if (tot_len < hlen || tot_len > skb->len - ETH_HLEN || (void *)ip + hlen > end)
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
    u32 need = l4_min_len(ip->protocol);
    if (!need)
        return REASON_FORWARDED;
    if (tot_len - hlen < need) {
        p->l4_short = 1;
        return p->frag == FRAG_FIRST ? REASON_FORWARDED : REASON_MALFORMED;
    }
    void *l4 = (void *)ip + hlen;
    /* the header is in the packet; not in the linear data only if the pull failed */
    if (l4 + 4 > end || (ip->protocol == IPPROTO_TCP && l4 + 14 > end))
        return REASON_MALFORMED;
    struct udphdr *ports = l4;  /* TCP's, UDP's and SCTP's ports sit in the same place */
    f->sport = ntohs(ports->source);
    f->dport = ntohs(ports->dest);
    f->has_l4 = 1;
    if (ip->protocol == IPPROTO_TCP)
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
