"""Launch planning for sft: CPU topology -> launch plan (ranks, threads, pinning, env) -> commands.

- :mod:`launch.topology` reads sockets, NUMA nodes, physical cores / hyperthreads and the allowed CPU set.
- :mod:`launch.plan` turns a topology into a :class:`launch.plan.LaunchPlan` and its commands, with
  :mod:`launch.network` (hostfile, the interface to the master), :mod:`launch.backends` (``auto``, oneCCL,
  ``ds-ccl`` prerequisites) and :mod:`launch.commands` (the launch forms); planning errors are
  :class:`launch.errors.PlanError`.
- :mod:`launch.pin` is the per-rank wrapper that pins a rank to its cores before exec'ing the training program.
- :mod:`launch.cli` holds the ``sft plan`` / ``sft launch`` argument parsing and commands.

Nothing in this package imports torch, so planning is instant and works on a login node.
"""
