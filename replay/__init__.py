"""Real datasets: loaders returning typed records, their conversion to the event contract, and the
replay that publishes them into Kafka in timestamp order."""
