"""The error of launch planning (topology errors are :class:`launch.topology.TopologyError`)."""


class PlanError(ValueError):
    """A plan cannot be made (bad hostfile, no usable cores, inconsistent arguments) or breaks an invariant."""
