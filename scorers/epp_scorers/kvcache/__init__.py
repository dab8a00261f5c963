"""Precise prefix-cache routing from vLLM KV events: block keys (keys), the events' wire format
(wire), the subscribers (subscriber), the block index (index, valkey_index) and the tokenizer
(tokenize). The plugins built on them live with their kinds (producers/, scorers/, datasources/).
See docs/kv-events.md."""
