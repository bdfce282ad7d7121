"""Tango device classes and server entry points (thin shells over the engine)."""
