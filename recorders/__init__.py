"""Recorder framework and sinks; recorders/sardana is the Sardana RecorderPath."""
