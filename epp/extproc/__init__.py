"""The Envoy ext_proc side of epp: one gRPC stream per HTTP request."""
