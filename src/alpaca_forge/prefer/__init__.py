"""prefer: preference pairs from a model's sampled answers, judged pairwise in both orders."""
