"""Flow control: epp's own queues in front of the pool (docs/flow-control.md).

When the saturation detector says the pool is full, requests wait here, by priority band (from
the InferenceObjective a request names) and, inside a band, by flow (fairness id); they are
dispatched as capacity frees, refused when a band is full, and evicted when their TTL runs out.
`config` reads the `flowControl` section, `controller` holds the queues, `admission` decides a
request's fate in the request path, `metrics` counts every outcome under upstream's names.
"""
