"""Sardana macros (this folder is the MacroServer MacroPath)."""
