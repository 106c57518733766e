/* Shared types and constants of meshagent's tc programs.
 *
 * Every struct here has a ctypes twin in plugins/ebpf/maps.py; tests/test_datapath_layout.py
 * compares both (sizes and field offsets) against what bcc compiles. */
#ifndef MESHAGENT_COMMON_H
#define MESHAGENT_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/pkt_cls.h>

#ifndef PIN_DIR
#define PIN_DIR "/sys/fs/bpf/meshagent"
#endif
#ifndef ENDPOINTS_MAX
#define ENDPOINTS_MAX 4096
#endif
#ifndef IPCACHE_MAX
#define IPCACHE_MAX 512000
#endif
#ifndef POLICY_MAX
#define POLICY_MAX 262144
#endif
#ifndef CT_TCP_MAX
#define CT_TCP_MAX 524288
#endif
#ifndef CT_ANY_MAX
#define CT_ANY_MAX 262144
#endif
#ifndef CT6_TCP_MAX
#define CT6_TCP_MAX 131072
#endif
#ifndef CT6_ANY_MAX
#define CT6_ANY_MAX 65536
#endif
#ifndef IPFRAG_MAX
#define IPFRAG_MAX 8192
#endif
#ifndef LB_SERVICES_MAX
#define LB_SERVICES_MAX 65536
#endif
#ifndef LB_BACKENDS_MAX
#define LB_BACKENDS_MAX 65536
#endif
#ifndef CT_LIFETIME_TCP_NS
#define CT_LIFETIME_TCP_NS (21600ULL * 1000000000ULL)
#endif
#ifndef CT_LIFETIME_ANY_NS
#define CT_LIFETIME_ANY_NS (60ULL * 1000000000ULL)
#endif

#define DIR_INGRESS 0 /* traffic entering the pod: its ingress policy */
#define DIR_EGRESS 1  /* traffic leaving the pod: its egress policy */

#define IDENTITY_WORLD 2       /* an IPv4 address no ipcache row covers */
#define IDENTITY_WORLD_IPV6 10 /* an IPv6 address no ipcache row covers */

/* Verdict reasons: index of the metrics array, the reason of a drop event, and skb->cb[0]
 * after the program ran (what the differential tests read back). */
#define REASON_FORWARDED 0
#define REASON_POLICY_DENY 1     /* a deny rule matched */
#define REASON_POLICY_DEFAULT 2  /* enforced, and no rule allows it */
#define REASON_SPOOFED 3         /* left a pod with a source address that is not the pod's */
#define REASON_FRAG_TINY 4       /* a fragment splits or overlaps the transport header */
#define REASON_FRAG_UNKNOWN 5    /* a later fragment whose first fragment was never seen */
#define REASON_MALFORMED 6       /* a bad IP header, extension header or truncated transport
                                  * header */
#define REASON_UNSUPPORTED_L3 7  /* neither IPv4, IPv6 nor ARP: it cannot be judged, so it is
                                  * dropped */
#define REASON_REDIRECTED 8      /* not a drop: handed to the DNS proxy's socket */
#define REASON_PROXY_LOOKUP 9    /* to be redirected, but no proxy socket (Cilium's
                                  * DROP_PROXY_LOOKUP_FAILED) */
#define REASON_PROXY_ASSIGN 10   /* the proxy's socket found, bpf_sk_assign refused it
                                  * (DROP_PROXY_SET_FAILED) */
#define REASON_PROXY_UNSUPPORTED 11 /* a redirect entry for a packet the proxy cannot take:
                                     * entering the pod, or neither TCP nor UDP
                                     * (DROP_PROXY_UNKNOWN_PROTO) */
#define REASON_MAX 12

#define VERDICT_ALLOW 1
#define VERDICT_DENY 2
#define VERDICT_REDIRECT 3  /* allowed, and delivered to the DNS proxy (Cilium: a proxy port) */

/* A packet for the proxy carries this mark (as Cilium's MARK_MAGIC_TO_PROXY, the port in the
 * upper 16 bits): the agent's ip rule sends it to a table that delivers everything locally. */
#define MARK_MAGIC_TO_PROXY 0x0200

/* Flow events (struct flow_event). FLOW_EVENTS 0 (--enable-hubble=false): drops only. */
#ifndef FLOW_EVENTS
#define FLOW_EVENTS 1
#endif
#define FLOW_DROP 1            /* kinds, numbered as Cilium's monitor message types */
#define FLOW_TRACE 4
#define FLOW_POLICY_VERDICT 5
#define FLOW_FORWARDED 1       /* verdicts, numbered as Hubble's flow.Verdict */
#define FLOW_DROPPED 2
#define FLOW_AUDIT 4
#define FLOW_REDIRECTED 5
#define MATCH_NONE 0           /* policy match types, as Cilium's PolicyMatchType */
#define MATCH_L3_ONLY 1
#define MATCH_L3_L4 2
#define MATCH_L4_ONLY 3
#define MATCH_ALL 4
#define MATCH_L3_PROTO 5
#define MATCH_PROTO_ONLY 6

#define ENDPOINT_LOCAL_DELIVERY 1  /* MACs known: local traffic may be redirected into it */
#define ENDPOINT_HAS_IPV6 2        /* dual stack: ipv6 is its address */
#define ENDPOINT_POLICY_AUDIT 4    /* what its policy would drop passes, reported as audit */

struct endpoint_info {
    u32 endpoint_id;
    u32 identity;
    u32 ipv4;       /* network byte order: the only source address its packets may carry */
    u32 generation; /* bumped whenever its verdicts may have changed (policy, ipcache) */
    u32 ifindex;    /* its host-side veth */
    u8 pod_mac[6];  /* the pod's eth0 */
    u8 host_mac[6]; /* the host-side veth */
    u32 flags;
    u32 born;       /* the generation it was added at: older conntrack entries (of an endpoint
                     * that had its id before) are not its own */
    u32 ipv6[4];    /* the only IPv6 source its packets may carry (ENDPOINT_HAS_IPV6) */
};

struct ipcache_key {
    u32 prefixlen;  /* LPM: bits of ip that count */
    u32 ip;         /* network byte order */
};

struct ipcache6_key {
    u32 prefixlen;
    u32 ip[4];
};

struct ipcache_value {
    u32 identity;
    u32 flags;
};

/* LPM trie key: endpoint, peer identity (0: any) and direction always match exactly
 * (POLICY_PREFIX_STATIC bits); then the protocol (8 bits, or none: any protocol) and the
 * destination port (0..16 bits, network byte order, so a port range is a few prefixes). */
struct policy_key {
    u32 prefixlen;
    u32 endpoint_id;
    u32 identity;
    u8 direction;
    u8 protocol;
    u16 port;       /* network byte order */
};

#define POLICY_PREFIX_STATIC 72  /* endpoint_id, identity, direction */
#define POLICY_PREFIX_FULL 96

struct policy_value {
    u8 verdict;     /* VERDICT_ALLOW, VERDICT_DENY or VERDICT_REDIRECT */
    u8 prefix;      /* the entry's prefix length over protocol and port: 0, 8, 9-24 */
    u8 pad[2];
};

struct ct_key {
    u32 saddr;
    u32 daddr;
    u16 sport;
    u16 dport;
    u8 protocol;
    u8 direction;
    u16 pad;
    u32 endpoint_id;
};

/* IPv6 connections: the same, with 128-bit addresses (no service NAT over IPv6). */
struct ct6_key {
    u32 saddr[4];
    u32 daddr[4];
    u16 sport;
    u16 dport;
    u8 protocol;
    u8 direction;
    u16 pad;
    u32 endpoint_id;
};

#define CT_REPLY 1     /* the reply direction of a connection: passes without policy */
#define CT_NAT_DST 2   /* rewrite the destination to nat_ip:nat_port (service -> backend) */
#define CT_NAT_SRC 4   /* rewrite the source to nat_ip:nat_port (backend -> service) */
#define CT_PROXY 8     /* a forward entry whose packets go to the DNS proxy (a redirect) */

struct ct_value {
    u64 last_seen_ns;
    u32 generation; /* the endpoint generation the connection was last judged at */
    u32 nat_ip;     /* network byte order */
    u16 nat_port;   /* host byte order */
    u8 flags;
    u8 seen;        /* CT_SEEN and the TCP flags (CT_TRACED_FLAGS) this direction reported */
    u8 closing;     /* CT_CLOSE_*: the FINs and RSTs the connection saw (either half) */
    u8 pad[3];
};

#define CT_SEEN 0x80           /* a packet of this direction was reported */
#define CT_TRACED_FLAGS 0x07   /* FIN, SYN, RST: reported the first time in a direction */

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

/* ct_value.closing. A connection is closing once both directions sent a FIN, or either an
 * RST (Cilium's tx_closing and rx_closing): its entries then live CT_CLOSE_TIMEOUT_NS, and a
 * SYN on them starts a new connection (Cilium's CT_REOPENED). */
#define CT_CLOSE_FIN 1         /* this entry's direction sent a FIN */
#define CT_CLOSE_FIN_OTHER 2   /* the other direction sent a FIN */
#define CT_CLOSE_RST 4         /* an RST went either way */
#ifndef CT_CLOSE_TIMEOUT_NS
#define CT_CLOSE_TIMEOUT_NS 10000000000ULL  /* Cilium's CT_CLOSE_TIMEOUT: 10 s */
#endif

/* The first fragment's ports, for the fragments after it (as Cilium's lib/ipfrag.h). */
struct ipfrag_key {
    u32 saddr;
    u32 daddr;
    u16 id;         /* network byte order */
    u8 protocol;
    u8 pad;
};

struct ipfrag6_key {
    u32 saddr[4];
    u32 daddr[4];
    u32 id;         /* the fragment header's identification, network byte order */
    u8 protocol;
    u8 pad[3];
};

struct ipfrag_ports {
    u16 sport;
    u16 dport;
};

struct metrics_value {
    u64 packets;
    u64 bytes;
};

/* One reported packet: a drop, a policy verdict or a trace (what FlowEvent says). */
struct flow_event {
    u64 time_ns;
    u32 reason;     /* REASON_*: the drop's, an audit's would-be drop, or forwarded */
    u32 endpoint_id;
    u32 saddr;
    u32 daddr;
    u16 sport;
    u16 dport;
    u8 protocol;
    u8 tcp_flags;
    u8 direction;
    u8 family;      /* 4: saddr/daddr; 6: saddr6/daddr6 */
    u32 src_identity;
    u32 dst_identity;
    u32 saddr6[4];
    u32 daddr6[4];
    u8 kind;        /* FLOW_DROP, FLOW_POLICY_VERDICT or FLOW_TRACE */
    u8 verdict;     /* FLOW_FORWARDED, FLOW_DROPPED, FLOW_AUDIT or FLOW_REDIRECTED */
    u8 is_reply;    /* the reply direction of a tracked connection */
    u8 match;       /* MATCH_*: the policy entry that decided (policy verdicts, drops) */
    u32 pad;
};

struct lb_service_key {
    u32 vip;        /* network byte order */
    u16 port;       /* host byte order */
    u8 protocol;
    u8 pad;
};

struct lb_service {
    u32 service_id;
    u32 count;      /* backends in slots 0..count-1 */
};

struct lb_backend_key {
    u32 service_id;
    u32 slot;
};

struct lb_backend {
    u32 ip;         /* network byte order */
    u16 port;       /* host byte order */
    u16 pad;
};

/* The parsed packet: what policy and conntrack look at. */
struct flow {
    u32 saddr;      /* IPv4 */
    u32 daddr;
    u16 sport;
    u16 dport;
    u8 protocol;
    u8 tcp_flags;
    u16 l4_off;     /* where the transport header starts */
    u8 has_l4;      /* the transport header is in this packet (not a later fragment) */
    u8 family;      /* 4 or 6 */
    u8 hop_limit;   /* IPv6 */
    u8 icmp_type;   /* ICMP or ICMPv6, when has_icmp */
    u8 has_icmp;
    u8 icmp_code;   /* when the packet holds it too (flow events report it) */
    u8 pad[2];
    u32 saddr6[4];  /* IPv6 */
    u32 daddr6[4];
};

#endif
