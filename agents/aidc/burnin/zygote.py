"""Start every node's burn-in process by forking one process that imported torch once.

Importing torch, and the torch._dynamo that DDP's constructor pulls in, costs several
CPU-seconds per process; five lab nodes on two shared cores paid that five times over
(most of a burn-in's wall time). Forking after the imports pays it once, the way a
DataLoader forks its workers. Nothing has computed yet when we fork (no thread pool has
started), and every child sets its own thread count.

`python -m aidc.burnin.zygote [RUN_DIR]` (RUN_DIR only names the run in `ps`) imports
first, then reads the worker config paths from stdin, one per line (the runner writes
them meanwhile, so both processes import at once), forks one child per config, runs
`aidc.burnin.worker.main` in it with stderr to the config's log file, reports each
child's exit on stdout, and on the first failure kills the remaining children.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import traceback

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Be killed when the parent dies, even by SIGKILL: a dead runner leaves no workers behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the runner's process-group kill still applies
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def main() -> int:
    die_with_parent(os.getppid())
    import torch  # noqa: F401  (preloaded for the children)
    import torch._dynamo  # noqa: F401
    import torch.distributed  # noqa: F401
    from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    from torch.nn.parallel import DistributedDataParallel  # noqa: F401

    from aidc.burnin import collectives, gemm, localise, memory, train, worker  # noqa: F401
    from aidc.lab import fabric  # noqa: F401  (workers enter their namespace with it)

    config_paths = [line.strip() for line in sys.stdin if line.strip()]
    if not config_paths:  # the runner gave up before sending any work
        return 2
    children: dict[int, str] = {}
    zygote = os.getpid()
    for path in config_paths:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                die_with_parent(zygote)
                from aidc.files import SHARED_MODE, open_nofollow

                log = open_nofollow(path.removesuffix(".json") + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                                    SHARED_MODE)
                os.dup2(log, 2)
                code = worker.main(path)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                # No interpreter teardown: a device call abandoned by TimedBackend (a hung
                # driver) must not keep this process alive, nor may it run the parent's atexit.
                os._exit(code)
        children[pid] = path
    worker.emit("forked", nodes=len(children))  # the runner's join deadline starts now, not at import
    worst = 0
    while children:
        pid, status = os.wait()
        path = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        worker.emit("exit", config=path, code=code)
        if code != 0 and worst == 0:
            worst = 1
            for other in children:  # the collectives would only wait for the dead peer
                try:
                    os.kill(other, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    return worst


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
