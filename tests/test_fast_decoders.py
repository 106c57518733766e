"""The fast paths of the remote-entry decoders read exactly what the slow ones read."""

import ipaddress
import json
import random

from meshagent.model.identity import parse_labels
from meshagent.model.ipcache import ipcache_from_json


def spellings(count: int, seed: int) -> list[str]:
    """Dotted quads and near misses: leading zeros, signs, spaces, five parts, big octets,
    non-ASCII digits."""
    rng = random.Random(seed)
    parts = ["0", "1", "9", "10", "99", "100", "255", "256", "999", "01", "00", "1 ", " 1",
             "+1", "-1", "0x1", "١", ""]
    out = []
    for _ in range(count):
        out.append(".".join(rng.choice(parts) for _ in range(rng.choice((3, 4, 4, 4, 5)))))
    return out + ["1.2.3.4\x00", "1.2.3.4/32", "::1", "::ffff:1.2.3.4", "fe80::1%eth0"]


def test_an_ip_field_is_read_as_ipaddress_reads_it():
    def read(parse, text):
        try:
            return parse(text)
        except ValueError:
            return None
    differ = [text for text in spellings(3000, seed=1)
              if read(lambda t: ipcache_from_json(json.dumps({"IP": t, "ID": 70000}).encode(),
                                                  "cluster2").packed, text)
              != read(lambda t: ipaddress.ip_address(t).packed, text)]
    assert differ == []


def test_labels_are_shared_between_identities():
    first = parse_labels("k8s:app=a;k8s:io.kubernetes.pod.namespace=default;")
    second = parse_labels("k8s:app=b;k8s:io.kubernetes.pod.namespace=default;")
    (a,) = (label for label in first if "namespace" in label)
    (b,) = (label for label in second if "namespace" in label)
    assert a is b


def test_identities_of_entries_are_shared():
    one = ipcache_from_json(b'{"IP":"10.0.0.1","ID":1234567}', "c")
    two = ipcache_from_json(b'{"IP":"10.0.0.2","ID":1234567}', "c")
    assert one.identity is two.identity
