"""aidc.lab stage."""
