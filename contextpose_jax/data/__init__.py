"""Input pipeline: grain over the TFDS data sources built by `data_prep`."""
