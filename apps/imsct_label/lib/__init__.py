"""Tasks of the IMSCT MONAI Label app: thin layers over the ``imsct`` library."""
