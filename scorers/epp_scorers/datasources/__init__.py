"""Data sources: plugins deriving from `epp.framework.DataSource`. epp scrapes vLLM and SGLang
metrics itself, so the Go EPP's data-source types live here only so that configs naming them
load: they accept any parameters, do nothing and warn that the entry has no effect."""
