"""A two-rank job in which rank 1 fails (TEST_FAILURE=error) or hangs (TEST_FAILURE=hang), run through
astra-ds's command-line error handling; tests/test_distributed.py checks that the job ends with that error
(or rank 0's timeout) instead of hanging.

    mpirun -np 2 python -m tests.failing_rank train
    deepspeed --num_accelerators 2 --module tests.failing_rank train
"""

import os
import sys
import time

import torch.distributed as dist

from astra_ds.cli import main as cli_main, train as train_command


def fail_or_hang_on_rank_1(args) -> None:
    from astra_ds.dist import init_distributed

    info = init_distributed(timeout_s=float(os.environ.get("TEST_TIMEOUT_S", "10")))
    if info.rank == 1:
        if os.environ["TEST_FAILURE"] == "error":
            raise RuntimeError("injected failure on rank 1")
        time.sleep(600)
    dist.barrier()


if __name__ == "__main__":
    train_command.cmd_train = fail_or_hang_on_rank_1  # build_parser binds `train` to this
    sys.exit(cli_main.main(sys.argv[1:]))
