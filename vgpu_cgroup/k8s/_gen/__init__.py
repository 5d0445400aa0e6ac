"""Generated from the kubelet-compatible .proto files here by scripts/gen-protos."""
