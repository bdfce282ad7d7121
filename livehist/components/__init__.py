"""The plain-Python components behind the Tango devices (ska-tango-base's component managers):
the histogrammer, the hs01/da00 re-streamer, histogram capture into the recorders and the
metadata model. They import the engine and the recorders, never Tango device classes.
"""
