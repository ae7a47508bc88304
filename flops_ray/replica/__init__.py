"""The replica layer: a copy of the model that runs queries, applies each step's update and carries its state."""
