"""What a model is (architecture, caches), where it comes from and how its weights are read."""
