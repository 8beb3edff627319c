"""DeLF extraction, matching, retrieval and evaluation; the scripts at this level are the command lines."""
