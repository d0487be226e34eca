"""The gRPC search service: servicer, admission control, metrics, CLI client and evaluation."""
