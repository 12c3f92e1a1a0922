"""Worker side of wrnsweep: models, data, the training engine and the Ray trainable."""
