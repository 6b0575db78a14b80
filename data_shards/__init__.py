"""Data I/O: sources, the WebDataset shard writer with its manifest, and streaming loaders."""
