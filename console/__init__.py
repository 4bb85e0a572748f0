"""``shoprank console``: server-rendered pages for the people who look at the engine."""
