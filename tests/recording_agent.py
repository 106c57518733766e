"""An agent whose datapath writes down every endpoint the feed hands it: run where a test
would run ``meshagent`` (in a node's namespace), to see what reaches the datapath.

    python recording_agent.py FILE AGENT-OPTIONS...

FILE gets one JSON line per endpoint of each batch: ``{"added": id, "policy_audit": bool}``
or ``{"removed": id}``. While FILE.refuse holds a number N > 0, the next N batches that add an
endpoint are refused (and not written down).
"""

import json
import os
import sys
from pathlib import Path

from meshagent import hookimpl
from meshagent.cli import build_agent
from meshagent.daemon.agent import run_forever
from meshagent.runtime.logsetup import configure_logging


class EndpointRecorder:
    """Meets the datapath contract (slot ``datapath``, provider ``recorder``)."""

    def __init__(self, path: str):
        self.path = path
        self.refuse = Path(path + ".refuse")

    @hookimpl
    def meshagent_register_datapath(self, registry):
        registry.register("recorder", lambda agent: self)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def reconcile(self, policies, ipcache) -> None:
        pass

    async def apply(self, batch) -> None:
        refusals = int(self.refuse.read_text()) if self.refuse.exists() else 0
        if refusals > 0 and batch.added:
            self.refuse.write_text(str(refusals - 1))
            raise RuntimeError("the recorder refused the batch")
        with open(self.path, "a") as out:
            for endpoint in batch.removed:
                out.write(json.dumps({"removed": endpoint.id}) + "\n")
            for endpoint in batch.added:
                out.write(json.dumps({"added": endpoint.id,
                                      "policy_audit": endpoint.policy_audit}) + "\n")


def main() -> None:
    path, argv = sys.argv[1], sys.argv[2:]
    agent = build_agent(argv, os.environ, extra_plugins=[("recorder", EndpointRecorder(path))])
    configure_logging(agent.config.get("log-format"), agent.config.get("debug"))
    run_forever(agent)


if __name__ == "__main__":
    main()
