"""Labels that change after training: added to a finished run (their rows from their texts) or retired from its
predictions, each change published as a new version of the model."""
