"""The data layer: the datastore of endpoints (written by discovery, read by the director), the
metrics scraper that polls each model server's /metrics, and the parser that turns a page into an
immutable EndpointMetrics snapshot."""
