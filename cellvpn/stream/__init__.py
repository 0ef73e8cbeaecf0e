"""The stream: frames, channels, session setup and keepalive, as a sans-IO state machine."""
