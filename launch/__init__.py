"""Launch planning for sft: CPU topology -> launch plan (ranks, threads, pinning, env) -> commands.

- :mod:`launch.topology` reads sockets, NUMA nodes, physical cores / hyperthreads and the allowed CPU set.
- :mod:`launch.plan` turns a topology into a :class:`launch.plan.LaunchPlan` and its commands.
- :mod:`launch.pin` is the per-rank wrapper that pins a rank to its cores before exec'ing the training program.
- :mod:`launch.cli` holds the ``sft plan`` / ``sft launch`` argument parsing and commands.

Nothing in this package imports torch, so planning is instant and works on a login node.
"""
