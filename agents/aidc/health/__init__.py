"""aidc.health stage."""
