"""Sub-commands of the ``imsct`` console command (see :mod:`imsct.cli`)."""
