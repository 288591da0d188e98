"""The gRPC service definition; Python modules are generated from it at install time."""
