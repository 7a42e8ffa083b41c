"""Several training runs in one launch (the scale-out tests): one interpreter start and one process group for all.

    deepspeed --num_gpus 4 tests/scaleout_runs.py RUNS.json      (or plain python for a world of one)

RUNS.json is a list of ``[recipe, [--key=value, ...]]``; each entry is one ``ds_msattn.train.train`` run with its
own output_dir. Exits 0 only if every run finished (the trainer's own exit path: destroy the group, os._exit).
"""

import json
import os
import sys
import traceback
from datetime import timedelta


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    runs = json.loads(open(args[0]).read())
    from ds_msattn.config import load_config
    from ds_msattn.train import default_distributed_env, train

    configs = [load_config(recipe, overrides) for recipe, overrides in runs]
    default_distributed_env()
    import deepspeed
    import torch.distributed as dist

    timeout = timedelta(seconds=configs[0].parallel.timeout_s)
    deepspeed.init_distributed(dist_backend="gloo", timeout=timeout)
    code = 0
    try:
        for cfg in configs:
            train(cfg)
            dist.barrier()
    except BaseException:  # noqa: BLE001 - report, exit non-zero
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0:
        dist.destroy_process_group()
    os._exit(code)


if __name__ == "__main__":
    main()
