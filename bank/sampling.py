"""The sampler's read path: proposals and crops read as the decoded chunks that cover them.

``ProposalReader`` rebuilds any K proposals of a scan's set inside a region;
``ChunkCache`` (one per process) keeps decoded chunks for the next overlapping crop
and hands a region out as ``Piece``s; ``proposal_layer_array`` names a proposal
layer's array as ``ScanView.read`` and ``ChunkCache`` take it.
"""

from .chunk_cache import ChunkCache, Piece
from .layout import proposal_layer_array
from .proposal_store import ProposalReader

__all__ = ["ChunkCache", "Piece", "ProposalReader", "proposal_layer_array"]
