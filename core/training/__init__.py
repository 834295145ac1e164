"""Training, evaluation and data reading: apart from serving, which never imports this package."""
