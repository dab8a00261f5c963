"""Request control: one request between the ext_proc stream and the scheduler. Parsing the body
into an InferenceRequest (`parsing`), the director (candidates, scheduling, the in-flight ledger,
fallbacks, release), and reading token usage from the response (`usage`)."""
