"""The model's life on the line, without Ray or ZeroMQ: the registry of versions and their pointers, the
sample store operators and the agent fill, the promotion gate, and score drift. `actors/` runs these in the
agent's processes; `model/` stays the network, its scoring and its training."""
