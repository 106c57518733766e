"""DNS-aware egress: ``toFQDNs`` selectors, the ``rules: dns`` an endpoint may ask, the DNS
proxy that enforces them and the names it has seen (docs/dns.md)."""
