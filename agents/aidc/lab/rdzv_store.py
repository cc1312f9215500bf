"""The lab's external rendezvous store: a standalone c10d TCPStore on loopback.

Kept outside every elastic agent so that no node's death takes the rendezvous with it.
Run as `python -m aidc.lab.rdzv_store --port N`; runs until killed.
"""

from __future__ import annotations

import argparse
import signal
import sys
from datetime import timedelta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Standalone TCPStore for c10d rendezvous.")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args(argv)
    from torch.distributed import TCPStore

    store = TCPStore(args.host, args.port, is_master=True, multi_tenant=True, wait_for_workers=False,
                     timeout=timedelta(seconds=60))
    print(f"rendezvous store listening on {args.host}:{args.port}", flush=True)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    del store
    return 0


if __name__ == "__main__":
    sys.exit(main())
