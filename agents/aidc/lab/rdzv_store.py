"""The lab's external rendezvous store: a standalone c10d TCPStore on loopback.

Kept outside every elastic agent so that no node's death takes the rendezvous with it.
Run as `python -m aidc.lab.rdzv_store --port N`; runs until killed.

The store holds unauthenticated pickles (torch's rendezvous state), so it listens on the
one address it is given, which must be loopback or private: a TCPStore left to itself
listens on every interface whatever host it is given.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import socket
import sys
from datetime import timedelta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Standalone TCPStore for c10d rendezvous.")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args(argv)
    address = ipaddress.ip_address(args.host)
    if not (address.is_loopback or address.is_private):
        p.error(f"--host {args.host} is not a loopback or private address: the store's state is unauthenticated")
    from torch.distributed import TCPStore

    listener = socket.socket(socket.AF_INET6 if address.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(128)
    store = TCPStore(args.host, args.port, is_master=True, multi_tenant=True, wait_for_workers=False,
                     timeout=timedelta(seconds=60), master_listen_fd=listener.fileno())
    print(f"rendezvous store listening on {args.host}:{args.port}", flush=True)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    del store
    return 0


if __name__ == "__main__":
    sys.exit(main())
