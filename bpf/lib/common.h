/* Shared types and constants of meshagent's tc programs.
 *
 * Every struct here has a ctypes twin in plugins/ebpf/maps.py; tests/test_datapath_layout.py
 * compares both (sizes and field offsets) against what bcc compiles. */
#ifndef MESHAGENT_COMMON_H
#define MESHAGENT_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
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

#define IDENTITY_WORLD 2

/* Verdict reasons: index of the metrics array, the reason of a drop event, and skb->cb[0]
 * after the program ran (what the differential tests read back). */
#define REASON_FORWARDED 0
#define REASON_POLICY_DENY 1     /* a deny rule matched */
#define REASON_POLICY_DEFAULT 2  /* enforced, and no rule allows it */
#define REASON_SPOOFED 3         /* left a pod with a source address that is not the pod's */
#define REASON_FRAG_TINY 4       /* a fragment splits or overlaps the transport header */
#define REASON_FRAG_UNKNOWN 5    /* a later fragment whose first fragment was never seen */
#define REASON_MALFORMED 6       /* a bad IPv4 header or a truncated transport header */
#define REASON_UNSUPPORTED_L3 7  /* neither IPv4 nor ARP: it cannot be judged, so it is dropped */
#define REASON_MAX 8

#define VERDICT_ALLOW 1
#define VERDICT_DENY 2

#define ENDPOINT_LOCAL_DELIVERY 1  /* MACs known: local traffic may be redirected into it */

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
};

struct ipcache_key {
    u32 prefixlen;  /* LPM: bits of ip that count */
    u32 ip;         /* network byte order */
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
    u8 verdict;     /* VERDICT_ALLOW or VERDICT_DENY */
    u8 pad[3];
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

#define CT_REPLY 1     /* the reply direction of a connection: passes without policy */
#define CT_NAT_DST 2   /* rewrite the destination to nat_ip:nat_port (service -> backend) */
#define CT_NAT_SRC 4   /* rewrite the source to nat_ip:nat_port (backend -> service) */

struct ct_value {
    u64 last_seen_ns;
    u32 generation; /* the endpoint generation the connection was last judged at */
    u32 nat_ip;     /* network byte order */
    u16 nat_port;   /* host byte order */
    u8 flags;
    u8 pad[5];
};

/* The first fragment's ports, for the fragments after it (as Cilium's lib/ipfrag.h). */
struct ipfrag_key {
    u32 saddr;
    u32 daddr;
    u16 id;         /* network byte order */
    u8 protocol;
    u8 pad;
};

struct ipfrag_ports {
    u16 sport;
    u16 dport;
};

struct metrics_value {
    u64 packets;
    u64 bytes;
};

struct drop_event {
    u64 time_ns;
    u32 reason;
    u32 endpoint_id;
    u32 saddr;
    u32 daddr;
    u16 sport;
    u16 dport;
    u8 protocol;
    u8 tcp_flags;
    u8 direction;
    u8 pad;
    u32 src_identity;
    u32 dst_identity;
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
    u32 saddr;
    u32 daddr;
    u16 sport;
    u16 dport;
    u8 protocol;
    u8 tcp_flags;
    u16 l4_off;     /* where the transport header starts */
    u8 has_l4;      /* the transport header is in this packet (not a later fragment) */
};

#endif
