/* Shared types and constants of meshagent's tc programs. */
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
#ifndef LB_SERVICES_MAX
#define LB_SERVICES_MAX 65536
#endif
#ifndef LB_BACKENDS_MAX
#define LB_BACKENDS_MAX 65536
#endif
#ifndef LB_NAT_MAX
#define LB_NAT_MAX 262144
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

/* Verdict reasons: index of the metrics array, and the reason of a drop event. */
#define REASON_FORWARDED 0
#define REASON_POLICY_DENY 1     /* a deny rule matched */
#define REASON_POLICY_DEFAULT 2  /* enforced, and no rule allows it */
#define REASON_MAX 4

#define VERDICT_ALLOW 1
#define VERDICT_DENY 2

struct endpoint_info {
    u32 endpoint_id;
    u32 identity;
    u32 ipv4;      /* network byte order */
    u32 flags;
};

struct ipcache_key {
    u32 prefixlen;  /* LPM: bits of ip that count */
    u32 ip;         /* network byte order */
};

struct ipcache_value {
    u32 identity;
    u32 flags;
};

struct policy_key {
    u32 endpoint_id;
    u32 identity;   /* 0: any peer */
    u16 port;       /* host byte order; 0: any port */
    u8 protocol;    /* 0: any */
    u8 direction;
};

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

struct ct_value {
    u64 last_seen_ns;
    u64 packets;    /* 1 for the packet that opened it (not counted further: see conntrack.h) */
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

/* One connection to a frontend: the backend it got (forward), and the way back (reverse). */
struct lb_nat_key {
    u32 client_ip;
    u32 other_ip;   /* forward: the frontend; reverse: the backend */
    u16 client_port;
    u16 other_port;
    u8 protocol;
    u8 pad[3];
};

struct lb_nat_value {
    u32 ip;         /* forward: the backend; reverse: the frontend */
    u16 port;
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
};

#endif
