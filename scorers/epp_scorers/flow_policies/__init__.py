"""Flow-control policies: ordering (which request of a flow goes first) and fairness (which flow
of a priority band goes next)."""
