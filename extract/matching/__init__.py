"""Two images' features -> putative matches, RANSAC inliers, and their figure."""
