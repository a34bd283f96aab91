"""Model preparation: activation importance, normalized-MSE depth ranking, reordering.

    scores = compute_scores(model, batches, cfg.model, Aggregation(sequence="mean", batch="l2"))
    perms = permutations_from_scores(scores, cfg.model)       # every axis, most important first
    model.load_state_dict(permute_state_dict(model.state_dict(), cfg.model, perms))  # TP=1
    depth = depth_rankings(elastic_model, batches, cfg.model)  # {"iterative", "one_shot", "cosine"}

`prepare(ckpt, out, ...)` (``nemo_elastic.importance.prepare``) does all of it on a checkpoint.
"""

from nemo_elastic.importance.aggregate import Aggregation
from nemo_elastic.importance.depth import DepthRanking, depth_rankings
from nemo_elastic.importance.order import (LayerPermutation, Permutations, identity_permutations,
                                           permutations_from_scores, random_permutations,
                                           validate_permutations)
from nemo_elastic.importance.permute import permute_model_, permute_state_dict
from nemo_elastic.importance.scores import ImportanceScores, LayerScores, compute_scores

__all__ = [
    "Aggregation", "DepthRanking", "ImportanceScores", "LayerPermutation", "LayerScores",
    "Permutations", "compute_scores", "depth_rankings", "identity_permutations",
    "permutations_from_scores", "permute_model_", "permute_state_dict", "random_permutations",
    "validate_permutations",
]
