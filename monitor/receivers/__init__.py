"""Receivers turn what reaches the monitor from outside into Arrivals for the correlator."""
