"""The node program as a scheduler's task runs it: `python -m aidc.burnin.launch.node`.

The task learns its node from its scheduler (AIDC_BURNIN_NODE: a Kubernetes pod's spec.nodeName
through the downward API; SLURMD_NODENAME under Slurm), the run's store and secret from its
environment (aidc.burnin.launch.slurm, aidc.burnin.launch.kubernetes), fetches that node's config from the store, runs the
same node program as the lab (aidc.burnin.worker.run_node) and puts its raw results back as JSON.
Nothing goes through the node's disk: a task killed by its scheduler leaves no file behind.
"""

from __future__ import annotations

import os
import sys

from aidc.burnin.launch.slurm import ENV_SECRET, ENV_STORE, ENV_TIMEOUT
from aidc.errors import BurninError


ENV_NODE = "AIDC_BURNIN_NODE"  # set by the Kubernetes launcher's Job from the downward API
ENV_JOB = "AIDC_BURNIN_JOB"    # the Kubernetes launcher's run id (Slurm gives SLURM_JOB_ID)


def _node_name() -> str:
    node = os.environ.get(ENV_NODE) or os.environ.get("SLURMD_NODENAME")
    if not node:
        raise BurninError(f"the burn-in node program runs as a task of a burn-in job ({ENV_NODE} or SLURMD_NODENAME"
                          " is not set)")
    return node


def main() -> int:
    from aidc.burnin import worker
    from aidc.burnin.launch.store import NodeStoreClient

    node = _node_name()
    host, _, port = os.environ.get(ENV_STORE, "").rpartition(":")
    secret = os.environ.pop(ENV_SECRET, "")  # not inherited further than this process
    if not host or not port.isdigit() or not secret:
        raise BurninError(f"the burn-in node program needs {ENV_STORE}=host:port and {ENV_SECRET} from its launcher")
    client = NodeStoreClient(host, int(port), secret, float(os.environ.get(ENV_TIMEOUT, "300")))
    client.put_json(f"job/{node}", {"job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get(ENV_JOB),
                                    "task": os.environ.get("SLURM_PROCID")})
    cfg = client.get_json(f"config/{node}")
    # Config in, result out, in memory: the task leaves nothing on the node's disk, however it ends
    # (a killed job left a directory with the run's secret behind per node when this used files).
    return worker.run_node({**cfg, "store_prefix": secret}, lambda result: client.put_json(f"result/{node}", result))


if __name__ == "__main__":
    try:
        code = main()
    except BurninError as exc:  # one line for the job's log, not a traceback
        sys.stderr.write(f"aidc burn-in node: error: {exc}\n")
        code = exc.exit_code
    sys.stdout.flush()
    sys.stderr.flush()
    # No interpreter teardown: a device call abandoned by TimedBackend (a hung driver) must not
    # keep the task, and so the job, alive.
    os._exit(code)
