"""Running models on volumes: device choice, backend loading and caching, post-processing."""
