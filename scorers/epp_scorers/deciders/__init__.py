"""P/D deciders: plugins deriving from `epp.framework.PdDecider`. Once the decode endpoint is
picked, `disaggregate(cycle, request, decode_endpoint)` decides, synchronously and from producers'
data in the cycle state, whether the prompt is prefilled on a separate prefill endpoint."""
