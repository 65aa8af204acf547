"""Class-agnostic 3D mask proposals: generators, filters, features and the ProposalSet format."""

from maskbank.pipeline.proposals.proposal_set import ProposalSet, merge_sets

__all__ = ["ProposalSet", "merge_sets"]
