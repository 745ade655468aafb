"""The cloud daemon: gRPC server, cross-stream batching, and the tail of the model."""
