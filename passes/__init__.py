"""deployopt passes: one module per pass; REGISTRY maps recipe names to pass classes.

An explicit dict, no import magic: adding a pass means importing it here.
"""

from passes.channel_prune import ChannelPrunePass
from passes.cleanup import CleanupPass
from passes.distill import DistillPass
from passes.prune import MagnitudePrunePass
from passes.quantize import QuantizePass

REGISTRY: dict[str, type] = {
    "cleanup": CleanupPass,
    "prune": MagnitudePrunePass,
    "channel_prune": ChannelPrunePass,
    "distill": DistillPass,
    "quantize": QuantizePass,
}
