"""Distributed state, the one place sft talks to ``torch.distributed``: rank facts (ranks), the process group and
its collectives (group), oneCCL (ccl), and the heartbeat watchdog / desync detector (watchdog).

Imported as ``from sft import distributed as dist``; ``torch.distributed`` itself is imported as ``tdist`` wherever it is used."""

from sft.distributed.group import (CPU_BACKENDS, DEFAULT_TIMEOUT_S, EXPERIMENTAL_BACKENDS, all_gather_concat,
                            all_reduce_max_flag, all_reduce_min_int, all_reduce_sum, barrier, choose_backend,
                            enable_fsdp_on_cpu, init_process_group_if_needed, release_deepspeed_shm, run_metadata)
from sft.distributed.ranks import (LOCAL_RANK_VARS, LOCAL_SIZE_VARS, RANK_VARS, WORLD_SIZE_VARS, DistInfo, check_launch,
                            deepspeed_launch, device, dist_info, fsdp_launch, is_initialized, is_main_process,
                            oversubscription, resolve_deepspeed_config_file, sharded_launch, zero3_init)
from sft.distributed.watchdog import explain_failure, set_phase, start_watchdog, stop_watchdog


__all__ = [
    "CPU_BACKENDS", "DEFAULT_TIMEOUT_S", "EXPERIMENTAL_BACKENDS", "LOCAL_RANK_VARS", "LOCAL_SIZE_VARS", "RANK_VARS",
    "WORLD_SIZE_VARS", "DistInfo", "all_gather_concat", "all_reduce_max_flag", "all_reduce_min_int", "all_reduce_sum",
    "barrier", "check_launch", "choose_backend", "deepspeed_launch", "device", "dist_info", "enable_fsdp_on_cpu",
    "explain_failure", "fsdp_launch", "init_process_group_if_needed", "is_initialized", "is_main_process",
    "oversubscription", "release_deepspeed_shm", "resolve_deepspeed_config_file", "run_metadata", "set_phase",
    "sharded_launch", "start_watchdog", "stop_watchdog", "zero3_init",
]
