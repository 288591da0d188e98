"""Model architectures, one file each, looked up by their HF `architectures` name."""
