"""Filters: plugins deriving from `epp.framework.Filter`. `filter(cycle, request, endpoints)` narrows
the candidates of a profile before scoring (by pod labels, roles or prefix-cache affinity); an
empty result stops the profile."""
