"""A finished run loaded for inference (XCModel: predict, encode, evaluate) and exported for other serving stacks."""
