"""`make demo`: the landmark dataset made from scikit-image's photos, and the demo's pipeline."""
