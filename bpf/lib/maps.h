/* The pinned maps: one set for every endpoint, kept across agent restarts. */
#ifndef MESHAGENT_MAPS_H
#define MESHAGENT_MAPS_H

#include "lib/common.h"

BPF_TABLE_PINNED("hash", u32, struct endpoint_info, endpoints, ENDPOINTS_MAX,
                 PIN_DIR "/endpoints");
BPF_TABLE_PINNED("hash", u32, u32, local_ips, ENDPOINTS_MAX, PIN_DIR "/local_ips");
BPF_TABLE_PINNED("lpm_trie", struct ipcache_key, struct ipcache_value, ipcache, IPCACHE_MAX,
                 PIN_DIR "/ipcache", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct ipcache6_key, struct ipcache_value, ipcache6, IPCACHE_MAX,
                 PIN_DIR "/ipcache6", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct policy_key, struct policy_value, policy, POLICY_MAX,
                 PIN_DIR "/policy", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_value, ct_tcp, CT_TCP_MAX,
                 PIN_DIR "/ct_tcp");
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_value, ct_any, CT_ANY_MAX,
                 PIN_DIR "/ct_any");
BPF_TABLE_PINNED("lru_hash", struct ct6_key, struct ct_value, ct6_tcp, CT6_TCP_MAX,
                 PIN_DIR "/ct6_tcp");
BPF_TABLE_PINNED("lru_hash", struct ct6_key, struct ct_value, ct6_any, CT6_ANY_MAX,
                 PIN_DIR "/ct6_any");
BPF_TABLE_PINNED("lru_hash", struct ipfrag_key, struct ipfrag_ports, ipfrag, IPFRAG_MAX,
                 PIN_DIR "/ipfrag");
BPF_TABLE_PINNED("lru_hash", struct ipfrag6_key, struct ipfrag_ports, ipfrag6, IPFRAG_MAX,
                 PIN_DIR "/ipfrag6");
BPF_TABLE_PINNED("percpu_array", u32, struct metrics_value, metrics, REASON_MAX,
                 PIN_DIR "/metrics");
BPF_TABLE_PINNED("hash", struct lb_service_key, struct lb_service, lb_services,
                 LB_SERVICES_MAX, PIN_DIR "/lb_services");
BPF_TABLE_PINNED("hash", struct lb_backend_key, struct lb_backend, lb_backends,
                 LB_BACKENDS_MAX, PIN_DIR "/lb_backends");
/* The last endpoint generation given out, so that a restarted agent goes on from there even
 * when other maps were started afresh. Only the agent reads and writes it. */
BPF_TABLE_PINNED("array", u32, u32, generation, 1, PIN_DIR "/generation");
/* The port the agent's DNS proxy listens on (0: none), written by the agent. */
BPF_TABLE_PINNED("array", u32, u32, proxy_port, 1, PIN_DIR "/proxy_port");
BPF_PERF_OUTPUT(flow_events);

#endif
