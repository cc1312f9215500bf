"""The lab's trainer as a plain torchrun entry point, for the goodput bench's baseline.

    python -m torch.distributed.run --nnodes 4:4 ... -m aidc.lab.torchrun_worker CFG_JSON

torchrun's own launcher starts each worker as a fresh interpreter (no warm pool) and the
rendezvous runs with torch's defaults or the tuned settings the bench passes; the training
itself (model, batches, encrypted checkpoints, step logs) is the lab's, unchanged.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    from aidc.lab.trainer import train

    args = sys.argv[1:] if argv is None else argv
    return train(json.loads(args[0]))


if __name__ == "__main__":
    sys.exit(main())
