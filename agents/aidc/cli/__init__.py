"""The `aidc` command: a thin shell over the stages."""
