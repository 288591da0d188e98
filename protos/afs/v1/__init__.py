"""Version 1 of the afs gRPC service; `python -m protos.build` generates its modules."""
