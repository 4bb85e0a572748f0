"""The ranking service: query events in, personal ranked results out. Never imports torch."""
