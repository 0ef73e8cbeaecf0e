"""The data plane: lease pool, packet handling and routing between the TUN and sessions."""
