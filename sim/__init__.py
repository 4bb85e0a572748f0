"""SIMULATION: simulated shoppers on the real Best Buy catalog and query texts (issue 18, item 2).

Nothing this package produces is a measurement of real shoppers; every output says so.
"""

LABEL = "SIMULATION"
