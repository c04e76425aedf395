"""Implementation of the ``milcell`` command (private; the entry point is :func:`milcell.cli.main`)."""
