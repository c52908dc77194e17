"""The inference side of a finished run: the model card, the serving index, the loaded model, the export."""
