"""The one ``torch.fx`` channel-group engine: trace a network, find the channels tied through
adds, concatenations, grouped convs, gates and norms, and say what cannot be followed.

Used by :func:`dynaslice.make_supernet` (each sliceable group becomes a width dimension), by channel
ordering (:mod:`dynaslice.ordering`) and by every pruning method (:mod:`dynaslice.prune.common`).
"""

from .groups import Analysis, ChannelGroup, Layout, Member, Segment, analyze, describe
from .trace import GraphError, Tracer, modes_kept, trace

__all__ = [
    "Analysis",
    "ChannelGroup",
    "GraphError",
    "Layout",
    "Member",
    "Segment",
    "Tracer",
    "analyze",
    "describe",
    "modes_kept",
    "trace",
]
