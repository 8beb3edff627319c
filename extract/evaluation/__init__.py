"""Revisited Oxford / Paris: the dataset files, the feature cache, the evaluation's orchestration, metrics, figures."""
