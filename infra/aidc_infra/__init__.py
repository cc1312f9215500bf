"""aidc's Pulumi components: one ComponentResource per concern, all driven by the cluster spec.

`infra/__main__.py` reads the spec from stack config and calls `program.build`; the components
take typed arguments and never read config themselves, so tests can build them directly.
"""
