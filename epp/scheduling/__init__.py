"""Scheduling: profiles of filters, weighted scorers and a picker, run by a profile handler."""
