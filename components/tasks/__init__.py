"""Tasks (segmentation, ...): each a package with its data readers, models, baselines, metrics, screening
probe and trainer; task-independent helpers (splits, loss registry, re-training tables) live here."""
