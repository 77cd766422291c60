"""One module per protocol: a thin adapter from its wire format to the lifecycle and back."""
