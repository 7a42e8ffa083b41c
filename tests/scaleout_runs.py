"""Several training runs in one launch (the scale-out tests): one interpreter start and one process group for all.

    deepspeed --num_gpus 4 tests/scaleout_runs.py RUNS.json      (or plain python for a world of one)

RUNS.json is a list of ``[recipe, [--key=value, ...]]``; each entry is one ``ds_msattn.train.train`` run with its
own output_dir (the first one's parallel.timeout_s applies to all). With ``--hang-test`` instead: join the group,
then rank 1 stops itself (SIGSTOP, a hung peer) and rank 0 waits on it in a sequence-parallel group's collective
(exit 3 once it raised). Exits 0 only if every run finished (the trainer's exit path, parallel.exit.exit_rank).
"""

import json
import os
import sys
import traceback


def hang_test(timeout_s: float) -> None:
    """Rank 0 must raise from a collective on DeepSpeed's SP group once its peer has hung for ``timeout_s``."""
    import signal

    import torch
    import torch.distributed as dist

    from ds_msattn.config import load_config
    from ds_msattn.parallel.groups import init_sequence_parallel_groups
    from ds_msattn.train import default_distributed_env, init_distributed

    default_distributed_env()
    init_distributed(load_config(None, [f"--parallel.timeout_s={timeout_s}"]))
    group = init_sequence_parallel_groups(2).sp_group  # created after init: must take the timeout too
    x = torch.ones(4)
    dist.all_reduce(x, group=group)  # both alive
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    print("waiting", flush=True)
    try:
        dist.all_reduce(x, group=group)
    except RuntimeError as err:
        print(f"raised: {err}", flush=True)
        os._exit(3)
    os._exit(0)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    if args[0] == "--hang-test":
        hang_test(float(args[1]))
    runs = json.loads(open(args[0]).read())
    from ds_msattn.config import load_config
    from ds_msattn.parallel.exit import exit_rank
    from ds_msattn.train import default_distributed_env, init_distributed, train

    configs = [load_config(recipe, overrides) for recipe, overrides in runs]
    default_distributed_env()
    import torch.distributed as dist

    init_distributed(configs[0])
    code = 0
    try:
        for cfg in configs:
            train(cfg)
            dist.barrier()
    except BaseException:  # noqa: BLE001 - report, exit non-zero
        traceback.print_exc()
        code = 1
    exit_rank(code)


if __name__ == "__main__":
    main()
