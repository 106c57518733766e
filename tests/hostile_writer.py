"""Writes into a cluster's etcd as an attacker who controls it: raw keys (any bytes) and
values, from a JSON list of operations. Run in a namespace that reaches the etcd:

    python hostile_writer.py ETCD_CONFIG OPERATIONS_JSON

Operations: ["put", key_hex, value_hex] or ["delete", key_hex].
"""

import asyncio
import json
import sys

from meshagent.plugins.etcd.client import EtcdKVStore
from meshagent.plugins.etcd.config import load_etcd_config


async def main(config: str, operations: str) -> None:
    store = EtcdKVStore(load_etcd_config(config))
    await store.connect()
    ops = json.loads(open(operations).read())
    semaphore = asyncio.Semaphore(64)

    async def run(op):
        async with semaphore:
            key = bytes.fromhex(op[1])
            if op[0] == "put":
                value = bytes.fromhex(op[2])
                await store._call(lambda c: c.put(key, value))
            else:
                await store._call(lambda c: c.delete(key))
    await asyncio.gather(*(run(op) for op in ops))
    await store.close()
    print(f"done {len(ops)}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
