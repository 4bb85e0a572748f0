"""The shared kernel every part uses: settings, the event contract, topics, Kafka clients, logging.

Nothing in here imports from ``features``, ``streams``, ``scorer`` or ``trainer``: data flows
one way, from this package outward.
"""
