"""Training DeLF and DELG, and what extract/ shares with it (checkpoints, outputs, runtime, command-line plumbing)."""
