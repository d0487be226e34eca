"""ETS: PRM-guided efficient tree search served over gRPC."""
