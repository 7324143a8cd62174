"""deployopt passes: one module per pass; REGISTRY maps recipe names to pass classes.

An explicit dict, no import magic: adding a pass means importing it here.
"""

from deployopt.passes.channel_prune import ChannelPrunePass
from deployopt.passes.cleanup import CleanupPass
from deployopt.passes.distill import DistillPass
from deployopt.passes.prune import MagnitudePrunePass
from deployopt.passes.quantize import QuantizePass
from deployopt.passes.recover import RecoverPass

REGISTRY: dict[str, type] = {
    "cleanup": CleanupPass,
    "prune": MagnitudePrunePass,
    "channel_prune": ChannelPrunePass,
    "distill": DistillPass,
    "recover": RecoverPass,
    "quantize": QuantizePass,
}
