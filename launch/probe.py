"""Check a launch before training: every rank prints one JSON line (rank, world size, backend, threads, pinning,
and the result of an all_reduce), e.g.

    sft launch --nodes 2 --hostfile hosts -- python -m launch.probe

It goes through the same path as training: :func:`sft.distributed.init_process_group_if_needed` first, then
accelerate's ``Accelerator()``, which must agree on the world size.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    import torch
    import torch.distributed as dist

    from sft import distributed as sd

    timeout = int(os.environ.get("SFT_PROBE_TIMEOUT_S", "60"))
    sd.init_process_group_if_needed(timeout_s=timeout)
    from accelerate import Accelerator

    acc = Accelerator()
    total = torch.tensor([acc.process_index + 1], dtype=torch.int64)
    if sd.is_initialized():
        dist.all_reduce(total)
    stop = sd.all_reduce_max_flag(acc.process_index == acc.num_processes - 1)
    min_index = sd.all_reduce_min_int(acc.process_index + 10)
    sd.barrier()
    out = {
        **sd.run_metadata(),
        "accelerate_num_processes": acc.num_processes,
        "accelerate_process_index": acc.process_index,
        "accelerate_distributed_type": str(acc.distributed_type).split(".")[-1],
        "all_reduce_sum": int(total.item()),
        "expected_sum": acc.num_processes * (acc.num_processes + 1) // 2,
        "stop_flag_agreed": stop,
        "min_int_agreed": min_index == 10,
        # which network stack and interface this rank used (multi-node tests run nodes as network namespaces)
        "gloo_socket_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
        "net_namespace": os.readlink("/proc/self/ns/net") if os.path.exists("/proc/self/ns/net") else None,
    }
    # one write() of the whole line: ranks share the launcher's pipe, and print() may split text and newline
    sys.stdout.write("SFT_PROBE " + json.dumps(out, sort_keys=True) + "\n")
    sys.stdout.flush()
    ok = out["all_reduce_sum"] == out["expected_sum"] and out["world_size"] == acc.num_processes and out["min_int_agreed"]
    if sd.is_initialized():
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
