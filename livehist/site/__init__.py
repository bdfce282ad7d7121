"""Site control: `livehist up/down/status/demo`, the one process launcher, the embedded
Tango database, the server catalogue, Sardana set-up and the Door client. Imports Tango
as a client; may import every lower layer.
"""
