"""What people look at: the Taurus panel (`livehist view`), PNG plots (`livehist plot`) and
the web view (`livehist web`). Tango clients; they import the engine, never devices.
"""
