"""Images -> features: one image's multi-scale DeLF features, the feature file, the PCA, runs over many images."""
