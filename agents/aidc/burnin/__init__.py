"""aidc.burnin stage."""
