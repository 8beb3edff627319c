"""Features -> rankings: ASMK* (asmk/), k-NN votes, DELG global descriptors, RANSAC re-ranking."""
