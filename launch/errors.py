"""The errors of launch planning and of pinning a rank (topology errors are :class:`launch.topology.TopologyError`)."""


class PlanError(ValueError):
    """A plan cannot be made (bad hostfile, no usable cores, inconsistent arguments) or breaks an invariant."""


class PinError(RuntimeError):
    """A rank cannot be pinned or started: no CPUs planned for its local rank, or no program to exec."""
