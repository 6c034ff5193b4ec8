"""hopwatch: synthetic transactions through integrated systems, timed and traced hop by hop."""

__version__ = "0.1.0"
