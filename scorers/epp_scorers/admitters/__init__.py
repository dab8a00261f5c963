"""Admitters: admit or refuse a request before it is scheduled."""
