"""Downloading the datasets and the official releases: the registry of URLs, fetching, unpacking, the manifest."""
