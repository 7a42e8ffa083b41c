"""mpirun entry point: ``ds_msattn.train`` with MPI finalised before the process exits.

The trainer ends with ``os._exit`` (gloo threads abort a normal interpreter exit, FACTS.md), which skips
mpi4py's own ``MPI_Finalize``; OpenMPI's launcher then reports every rank as an abnormal termination
and exits non-zero although training finished. Here ``os._exit`` first finalises MPI when DeepSpeed's MPI
discovery initialised it.
"""

import os
import sys

_real_exit = os._exit


def _exit_after_finalize(code: int) -> None:
    try:
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
            mpi.Finalize()
    finally:
        _real_exit(code)


if __name__ == "__main__":
    os._exit = _exit_after_finalize
    from ds_msattn.train import main

    sys.exit(main(sys.argv[1:]))
