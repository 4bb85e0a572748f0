"""SIMULATION: simulated shoppers on the real Best Buy catalog and query texts (issue 18, item 2).

Nothing this package produces is a measurement of real shoppers; every output says so.
"""

LABEL = "SIMULATION"
# Fine-tuning epochs per trainer cycle in a simulation: over a few hundred lists one epoch is a
# handful of steps (8 was chosen on seed 1: gain share -0.005 with 1, +0.003 with 8, 400 shoppers
# over 6 days). The product's default, 1, is for tens of thousands of lists.
TRAINER_EPOCHS = 8
