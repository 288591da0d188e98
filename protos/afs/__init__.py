"""The afs gRPC packages."""
