"""Parsers: plugins deriving from `epp.framework.Parser`. epp parses the OpenAI API itself, so
the Go EPP's request-parser types live here only so that configs naming them load: they accept
any parameters, do nothing and warn that the entry has no effect."""
