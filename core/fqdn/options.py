"""The DNS proxy's options: Cilium's names and defaults (``pkg/defaults``), durations in
seconds as every meshagent option."""

from meshagent.runtime.options import Parser, parse_bool


def add_fqdn_options(parser: Parser) -> None:
    parser.addoption("enable-dns-proxy", type=parse_bool, default=True,
                     help="run the DNS proxy when the policy resolver offers DNS rules and a"
                          " datapath is loaded (false: rules: dns and toFQDNs allow nothing)")
    parser.addoption("tofqdns-proxy-port", type=int, default=0,
                     help="port of the DNS proxy, UDP and TCP (0: the one it had before the"
                          " restart if free, else any)")
    parser.addoption("tofqdns-min-ttl", type=int, default=0,
                     help="seconds an answered address stays allowed at least (0: the TTL the"
                          " server gave)")
    parser.addoption("tofqdns-endpoint-max-ip-per-hostname", type=int, default=1000,
                     help="addresses an endpoint keeps per name (the earliest-expiring go"
                          " first)")
    parser.addoption("tofqdns-idle-connection-grace-period", type=float, default=0.0,
                     help="seconds an address stays allowed after its TTL, for connections"
                          " still idle then")
    parser.addoption("tofqdns-proxy-response-max-delay", type=float, default=0.1,
                     help="seconds an answer waits for the datapath to allow its addresses"
                          " before the pod gets it anyway")
    parser.addoption("tofqdns-dns-reject-response-code", type=str, default="refused",
                     choices=("refused", "nameError"),
                     help="the answer to a question the rules refuse")
    parser.addoption("dnsproxy-concurrency-limit", type=int, default=0,
                     help="questions the proxy handles at once (more: SERVFAIL; 0: no limit)")
    parser.addoption("tofqdns-gc-interval", type=float, default=60.0,
                     help="seconds between the DNS garbage collections that let expired"
                          " addresses go (Cilium: one minute)")
