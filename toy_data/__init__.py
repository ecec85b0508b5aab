"""Data files installed with ddim_edu as its subpackage ddim_edu.toy_data: the frozen toy samples and the offline photo (see README.md)."""
