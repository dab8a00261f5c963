"""Profile handlers: plugins deriving from `epp.framework.ProfileHandler`. `pick_profiles` decides
which scheduling profiles run, in rounds, given the results so far; `primary_profile` names the
result that routes the request; `routing_headers` may carry the other profiles' outcome (e.g. the
P/D prefill endpoint) to the model-server side."""
