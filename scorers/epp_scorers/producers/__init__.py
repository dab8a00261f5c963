"""Data producers: plugins deriving from `epp.framework.DataProducer`. They run once per request,
before any profile, and publish data in the cycle state under the typed keys `produces()` names
(`produce(cycle, request, endpoints)`), for scorers, filters and deciders to read; the loader
adds a default producer when a plugin consumes a key that no configured plugin produces."""
