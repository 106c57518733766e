/* Parsing an IPv4 or IPv6 packet into a flow, and the fragment rules.
 *
 * IPv4 headers are read in place; the few bytes read are pulled into the linear part of the
 * skb only when they are not there already. IPv6 headers are copied out (bpf_skb_load_bytes),
 * walking up to IPV6_MAX_HEADERS extension headers to the transport header, as Cilium's
 * ipv6_hdrlen() does. A packet whose IP or extension header is bad, or whose transport header
 * is cut short though it is not a fragment, is malformed. Fragments follow RFC 1858 and
 * Cilium's lib/ipfrag.h: a first fragment must hold the whole transport header, a later one
 * may not overlap it, and a later fragment takes the ports its first fragment recorded. */
#ifndef MESHAGENT_PARSE_H
#define MESHAGENT_PARSE_H

#include "lib/maps.h"

#define PARSE_ARP (-1)
#define IP_MORE_FRAGMENTS 0x2000
#define IP_OFFSET_MASK 0x1FFF
#define FRAG_NONE 0
#define FRAG_FIRST 1
#define FRAG_LATER 2
#define IPV6_MAX_HEADERS 4  /* extension headers walked; a packet with more is malformed */
#define IPV6_HLEN 40
#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH 51
#define NEXTHDR_DEST 60
#define NEXTHDR_ICMPV6 58

struct packet {
    struct flow f;
    u8 frag;         /* FRAG_NONE, FRAG_FIRST or FRAG_LATER */
    u8 l4_short;     /* this packet does not hold the whole transport header */
    u32 ip_id;       /* network byte order: IPv4's 16 bits, or the IPv6 fragment header's 32 */
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

/* An ICMP or ICMPv6 message whose type the packet shows (``f->icmp_type``): its "ports", what
 * policy and conntrack see. The destination port is the type, which policy looks up as the
 * port (Cilium's bpf/lib/policy.h); the source port is the echo partner's type for an echo
 * request or reply (``request``, ``reply``: the family's), else 0, so that an echo reply is
 * the reverse of its request and a message of another type the reply of nothing. */
static __always_inline void icmp_ports(struct flow *f, u8 request, u8 reply)
{
    f->has_icmp = 1;
    f->dport = f->icmp_type;
    f->sport = f->icmp_type == request ? reply : f->icmp_type == reply ? request : 0;
}

/* REASON_FORWARDED when ``p`` is filled from an IPv4 packet, or REASON_MALFORMED. */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct packet *p)
{
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
    f->family = 4;
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
    if (f->protocol == IPPROTO_ICMP && tot_len - hlen >= 1 &&
        bpf_skb_load_bytes(skb, ETH_HLEN + hlen, &f->icmp_type, 1) == 0) {
        if (tot_len - hlen >= 2)
            bpf_skb_load_bytes(skb, ETH_HLEN + hlen + 1, &f->icmp_code, 1);
        icmp_ports(f, 8, 0);
    }
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

static __always_inline int is_extension_header(u8 next)
{
    return next == NEXTHDR_HOP || next == NEXTHDR_ROUTING || next == NEXTHDR_FRAGMENT ||
           next == NEXTHDR_AUTH || next == NEXTHDR_DEST;
}

/* REASON_FORWARDED when ``p`` is filled from an IPv6 packet, or REASON_MALFORMED. */
static __always_inline int parse_ipv6(struct __sk_buff *skb, struct packet *p)
{
    struct ipv6hdr ip;
    if (skb->len < ETH_HLEN + IPV6_HLEN ||
        bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0 || ip.version != 6)
        return REASON_MALFORMED;
    u32 payload = ntohs(ip.payload_len);
    if (!payload && skb->gso_size)  /* BIG TCP */
        payload = skb->len - ETH_HLEN - IPV6_HLEN;
    if (payload > skb->len - ETH_HLEN - IPV6_HLEN)
        return REASON_MALFORMED;
    struct flow *f = &p->f;
    f->family = 6;
    f->hop_limit = ip.hop_limit;
    __builtin_memcpy(f->saddr6, &ip.saddr, 16);
    __builtin_memcpy(f->daddr6, &ip.daddr, 16);
    u32 end = ETH_HLEN + IPV6_HLEN + payload;
    u32 off = ETH_HLEN + IPV6_HLEN;
    u8 next = ip.nexthdr;
#pragma unroll
    for (int i = 0; i < IPV6_MAX_HEADERS; i++) {
        if (!is_extension_header(next))
            break;
        u8 hdr[8];
        if (off + 8 > end || bpf_skb_load_bytes(skb, off, hdr, 8) < 0)
            return REASON_MALFORMED;
        if (next == NEXTHDR_FRAGMENT) {
            u16 field = ((u16)hdr[2] << 8) | hdr[3];
            p->frag_offset = field & 0xFFF8;
            p->frag = p->frag_offset ? FRAG_LATER : (field & 1 ? FRAG_FIRST : FRAG_NONE);
            __builtin_memcpy(&p->ip_id, hdr + 4, 4);
            off += 8;
        } else if (next == NEXTHDR_AUTH) {
            off += ((u32)hdr[1] + 2) * 4;
        } else {
            off += ((u32)hdr[1] + 1) * 8;
        }
        next = hdr[0];
    }
    if (is_extension_header(next) || off > end)
        return REASON_MALFORMED;
    f->protocol = next;
    f->l4_off = off;
    if (p->frag == FRAG_LATER)
        return REASON_FORWARDED;  /* no transport header here: ports come from ipfrag6 */
    if (next == NEXTHDR_ICMPV6 && off + 1 <= end &&
        bpf_skb_load_bytes(skb, off, &f->icmp_type, 1) == 0) {
        if (off + 2 <= end)
            bpf_skb_load_bytes(skb, off + 1, &f->icmp_code, 1);
        icmp_ports(f, 128, 129);
    }
    u32 need = l4_min_len(next);
    if (!need)
        return REASON_FORWARDED;
    if (end - off < need) {
        p->l4_short = 1;
        return p->frag == FRAG_FIRST ? REASON_FORWARDED : REASON_MALFORMED;
    }
    u8 l4[14];
    if (bpf_skb_load_bytes(skb, off, l4, next == IPPROTO_TCP ? 14 : 4) < 0)
        return REASON_MALFORMED;
    f->sport = ((u16)l4[0] << 8) | l4[1];
    f->dport = ((u16)l4[2] << 8) | l4[3];
    f->has_l4 = 1;
    if (next == IPPROTO_TCP)
        f->tcp_flags = l4[13];
    return REASON_FORWARDED;
}

/* REASON_FORWARDED when ``p`` is filled, PARSE_ARP, REASON_UNSUPPORTED_L3 (another
 * ethertype: the datapath cannot judge it, so it never passes an enforcing endpoint), or
 * REASON_MALFORMED. */
static __always_inline int parse(struct __sk_buff *skb, struct packet *p)
{
    if (!linear(skb, ETH_HLEN))
        return REASON_MALFORMED;
    struct ethhdr *eth = (void *)(long)skb->data;
    if ((void *)(eth + 1) > (void *)(long)skb->data_end)
        return REASON_MALFORMED;
    if (eth->h_proto == htons(ETH_P_ARP))
        return PARSE_ARP;
    if (eth->h_proto == htons(ETH_P_IP))
        return parse_ipv4(skb, p);
    if (eth->h_proto == htons(ETH_P_IPV6))
        return parse_ipv6(skb, p);
    return REASON_UNSUPPORTED_L3;
}

/* Whether an ICMPv6 packet is the link's own control traffic, which passes as ARP does:
 * neighbour discovery (RFC 4861: hop limit 255, so it was not routed) and MLD (hop limit 1).
 * Leaving the pod it must be addressed within the link (link-local or link-scope multicast),
 * so it can never reach another node. */
static __always_inline int link_control(struct packet *p, u8 direction)
{
    struct flow *f = &p->f;
    if (f->family != 6 || f->protocol != NEXTHDR_ICMPV6 || !f->has_icmp ||
        p->frag != FRAG_NONE)
        return 0;
    u8 type = f->icmp_type;
    int nd = type >= 133 && type <= 137 && f->hop_limit == 255;
    int mld = (type == 130 || type == 131 || type == 132 || type == 143) && f->hop_limit == 1;
    if (!nd && !mld)
        return 0;
    if (direction == DIR_INGRESS)
        return 1;
    u32 first = ntohl(f->daddr6[0]);
    return (first & 0xFFC00000) == 0xFE800000 || (first & 0xFFFF0000) == 0xFF020000;
}

/* The ipfrag entry of the packet's datagram, in its family's map: recorded as ``ports`` when
 * given, else looked up (0 if none). */
static __always_inline struct ipfrag_ports *ipfrag_access(struct packet *p,
                                                          struct ipfrag_ports *ports)
{
    if (p->f.family == 6) {
        struct ipfrag6_key key = {.id = p->ip_id, .protocol = p->f.protocol};
        __builtin_memcpy(key.saddr, p->f.saddr6, 16);
        __builtin_memcpy(key.daddr, p->f.daddr6, 16);
        if (ports)
            ipfrag6.update(&key, ports);
        return ports ? 0 : ipfrag6.lookup(&key);
    }
    struct ipfrag_key key = {.saddr = p->f.saddr, .daddr = p->f.daddr, .id = p->ip_id,
                             .protocol = p->f.protocol};
    if (ports)
        ipfrag.update(&key, ports);
    return ports ? 0 : ipfrag.lookup(&key);
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
    if (p->frag == FRAG_FIRST) {
        if (p->l4_short)
            return REASON_FRAG_TINY;
        struct ipfrag_ports ports = {.sport = p->f.sport, .dport = p->f.dport};
        ipfrag_access(p, &ports);
        return REASON_FORWARDED;
    }
    if (p->frag_offset < need)
        return REASON_FRAG_TINY;  /* would overwrite part of the transport header */
    struct ipfrag_ports *ports = ipfrag_access(p, 0);
    if (!ports)
        return REASON_FRAG_UNKNOWN;
    p->f.sport = ports->sport;
    p->f.dport = ports->dport;
    return REASON_FORWARDED;
}

#endif
